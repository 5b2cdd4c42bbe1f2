//! Class scores: [`softmax`] over a model's logits, the [`top_k`] best indices, and [`ranked`]
//! lists of [`ClassScore`] (label + score, best first) as the classification tasks return them.
//!
//! Orderings here are total and deterministic, so two runs (or two plugins) on the same scores
//! always agree: higher score first, equal scores by lower index, NaN last.

use std::cmp::Ordering;

use crate::{ClassScore, Error};

/// The softmax of `logits`: non-negative values summing to 1, in the same order.
///
/// Computed as `exp(x - max) / sum`, so large logits (1000.0) do not overflow. An empty slice
/// gives an empty vector.
///
/// Non-finite logits never panic and give these results:
/// * any NaN: every output is NaN (a broken model should be noticed, not hidden; check with
///   `is_finite` before using the scores);
/// * `+inf` (and no NaN): the `+inf` entries share the probability equally, the others get 0;
/// * all `-inf`: every output is NaN, as there is no finite logit to normalise against; a
///   `-inf` among finite logits simply gets 0.
///
/// # Examples
///
/// ```
/// use kiln_sdk::scores::softmax;
///
/// // exp([0, ln 3]) = [1, 3], so the probabilities are [1/4, 3/4].
/// let p = softmax(&[0.0, 3f32.ln()]);
/// assert!((p[0] - 0.25).abs() < 1e-6 && (p[1] - 0.75).abs() < 1e-6);
///
/// // Shifting every logit changes nothing, even far beyond `exp`'s range.
/// let small = softmax(&[1.0, 2.0, 3.0]);
/// let large = softmax(&[1001.0, 1002.0, 1003.0]);
/// assert!(small.iter().zip(&large).all(|(a, b)| (a - b).abs() < 1e-6));
/// assert!(softmax(&[]).is_empty());
/// ```
pub fn softmax(logits: &[f32]) -> Vec<f32> {
    if logits.iter().any(|x| x.is_nan()) {
        return vec![f32::NAN; logits.len()];
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::INFINITY {
        // exp(inf - inf) would be NaN: take the limit instead.
        let count = logits.iter().filter(|&&x| x == f32::INFINITY).count() as f32;
        return logits
            .iter()
            .map(|&x| if x == f32::INFINITY { 1.0 / count } else { 0.0 })
            .collect();
    }
    if max == f32::NEG_INFINITY {
        return vec![f32::NAN; logits.len()];
    }
    let mut out: Vec<f32> = logits.iter().map(|&x| (x - max).exp()).collect();
    // The max's own term is exp(0) = 1, so the sum is at least 1: no division by zero.
    let sum: f32 = out.iter().sum();
    out.iter_mut().for_each(|v| *v /= sum);
    out
}

/// Orders `(index, score)` pairs best first: higher score, then lower index; NaN after every
/// number (NaNs among themselves by index).
fn best_first(a: &(usize, f32), b: &(usize, f32)) -> Ordering {
    let by_score = match (a.1.is_nan(), b.1.is_nan()) {
        (false, false) => b.1.partial_cmp(&a.1).unwrap_or(Ordering::Equal),
        (false, true) => Ordering::Less,
        (true, false) => Ordering::Greater,
        (true, true) => Ordering::Equal,
    };
    by_score.then(a.0.cmp(&b.0))
}

/// The indices and scores of the `k` best `scores`, highest first; equal scores keep index
/// order, NaN scores come last. `k` larger than `scores.len()` returns them all.
///
/// # Examples
///
/// ```
/// use kiln_sdk::scores::top_k;
///
/// let scores = [0.1, 0.7, 0.2, 0.7];
/// // The tie at 0.7 goes to the lower index.
/// assert_eq!(top_k(&scores, 2), [(1, 0.7), (3, 0.7)]);
/// assert_eq!(top_k(&scores, 10).len(), 4);
/// ```
pub fn top_k(scores: &[f32], k: usize) -> Vec<(usize, f32)> {
    let mut indexed: Vec<(usize, f32)> = scores.iter().copied().enumerate().collect();
    let k = k.min(indexed.len());
    if k == 0 {
        return Vec::new();
    }
    // Partition first so that k best of a large vocabulary (ImageNet's 1000 classes) cost
    // O(n + k log k), not a full sort. The order is total, so the result is deterministic.
    if k < indexed.len() {
        indexed.select_nth_unstable_by(k - 1, best_first);
        indexed.truncate(k);
    }
    indexed.sort_unstable_by(best_first);
    indexed
}

/// Every label with its score, highest score first (ties by label order, NaN last).
///
/// `labels[i]` names `scores[i]`; different lengths are an [`Error::Internal`] (the model's
/// labels file does not match its graph).
///
/// # Examples
///
/// ```
/// use kiln_sdk::scores::{ranked, softmax};
///
/// let labels = ["negative", "neutral", "positive"].map(String::from);
/// let results = ranked(&labels, &softmax(&[-2.0, -0.8, 2.8]))?;
/// let order: Vec<&str> = results.iter().map(|c| c.label.as_str()).collect();
/// assert_eq!(order, ["positive", "neutral", "negative"]);
/// assert!(results[0].score > 0.9);
///
/// // A labels file that does not match the model's output is the plugin's error.
/// assert!(ranked(&labels, &[0.5, 0.5]).is_err());
/// # Ok::<(), kiln_sdk::Error>(())
/// ```
pub fn ranked(labels: &[String], scores: &[f32]) -> Result<Vec<ClassScore>, Error> {
    ranked_top_k(labels, scores, scores.len())
}

/// The `k` best labels with their scores, highest first: [`ranked`] cut to `k` entries (all of
/// them when `k` is larger).
///
/// # Examples
///
/// ```
/// use kiln_sdk::scores::{ranked_top_k, softmax};
///
/// let labels = ["cat", "dog", "fox", "owl"].map(String::from);
/// let best = ranked_top_k(&labels, &softmax(&[1.0, 3.0, 2.0, 0.0]), 2)?;
/// let names: Vec<&str> = best.iter().map(|c| c.label.as_str()).collect();
/// assert_eq!(names, ["dog", "fox"]);
/// # Ok::<(), kiln_sdk::Error>(())
/// ```
pub fn ranked_top_k(labels: &[String], scores: &[f32], k: usize) -> Result<Vec<ClassScore>, Error> {
    if labels.len() != scores.len() {
        return Err(Error::internal(format!(
            "{} labels for {} scores: the labels file does not match the model",
            labels.len(),
            scores.len()
        )));
    }
    Ok(top_k(scores, k)
        .into_iter()
        .map(|(i, score)| ClassScore {
            label: labels[i].clone(),
            score,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_close(got: &[f32], expected: &[f32], tolerance: f32) {
        assert_eq!(got.len(), expected.len(), "{got:?} vs {expected:?}");
        for (g, e) in got.iter().zip(expected) {
            assert!((g - e).abs() <= tolerance, "{got:?} vs {expected:?}");
        }
    }

    fn labels(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn softmax_by_hand() {
        // Equal logits: uniform.
        assert_close(&softmax(&[2.0, 2.0]), &[0.5, 0.5], 1e-7);
        // [0, ln 3]: exp gives [1, 3], so [1/4, 3/4].
        assert_close(&softmax(&[0.0, 3f32.ln()]), &[0.25, 0.75], 1e-7);
        assert_close(&softmax(&[5.0]), &[1.0], 0.0);
        assert!(softmax(&[]).is_empty());
    }

    #[test]
    fn softmax_matches_numpy() {
        // e = np.exp(x - x.max()); e / e.sum(), in float64, printed as float32:
        // x = [1, 2, 3]
        let expected = [0.090_030_57, 0.244_728_48, 0.665_240_94];
        assert_close(&softmax(&[1.0, 2.0, 3.0]), &expected, 1e-7);
        // x = [1000, 1001, 1002]: the same, and no overflow.
        assert_close(&softmax(&[1000.0, 1001.0, 1002.0]), &expected, 1e-7);
        // x = [0.5, -1.25, 3.0, 0.0, 2.0]
        assert_close(
            &softmax(&[0.5, -1.25, 3.0, 0.0, 2.0]),
            &[
                0.054_216_74,
                0.009_421_457,
                0.660_495_1,
                0.032_884_117,
                0.242_982_57,
            ],
            1e-7,
        );
        // The sentiment model's logits for "I love this product! It's amazing."; the graph's
        // own `probabilities` output is [0.007979165, 0.026529845, 0.9654911].
        assert_close(
            &softmax(&[-1.999_169_8, -0.797_733_2, 2.796_633_2]),
            &[0.007_979_165, 0.026_529_845, 0.965_491],
            1e-6,
        );
    }

    #[test]
    fn softmax_sums_to_one() {
        let p = softmax(&[-30.0, 0.1, 7.5, 88.0, -1e30]);
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(p.iter().all(|&v| (0.0..=1.0).contains(&v)));
    }

    #[test]
    fn softmax_of_non_finite_logits() {
        assert!(softmax(&[1.0, f32::NAN]).iter().all(|v| v.is_nan()));
        assert_eq!(
            softmax(&[1.0, f32::INFINITY, 3.0, f32::INFINITY]),
            [0.0, 0.5, 0.0, 0.5]
        );
        assert_close(&softmax(&[f32::NEG_INFINITY, 0.0]), &[0.0, 1.0], 0.0);
        assert!(softmax(&[f32::NEG_INFINITY; 2]).iter().all(|v| v.is_nan()));
    }

    #[test]
    fn top_k_orders_best_first_with_ties_by_index() {
        let scores = [0.1, 0.7, 0.2, 0.7, -3.0];
        // np.argsort(-np.array([0.1, 0.7, 0.2, 0.7, -3.0]), kind="stable") -> [1 3 2 0 4]
        assert_eq!(
            top_k(&scores, 5),
            [(1, 0.7), (3, 0.7), (2, 0.2), (0, 0.1), (4, -3.0)]
        );
        assert_eq!(top_k(&scores, 2), [(1, 0.7), (3, 0.7)]);
        assert_eq!(top_k(&scores, 1), [(1, 0.7)]);
        assert!(top_k(&scores, 0).is_empty());
        assert!(top_k(&[], 3).is_empty());
    }

    #[test]
    fn top_k_larger_than_len_returns_all() {
        assert_eq!(top_k(&[0.25, 0.75], 10), [(1, 0.75), (0, 0.25)]);
    }

    #[test]
    fn top_k_puts_nan_last() {
        let got = top_k(&[f32::NAN, 0.5, f32::NEG_INFINITY, f32::NAN, 2.0], 5);
        let indices: Vec<usize> = got.iter().map(|&(i, _)| i).collect();
        assert_eq!(indices, [4, 1, 2, 0, 3]);
        assert_eq!(top_k(&[f32::NAN, 0.5], 1), [(1, 0.5)]);
    }

    #[test]
    fn ranked_names_every_score_best_first() {
        let got = ranked(
            &labels(&["negative", "neutral", "positive"]),
            &[0.2, 0.1, 0.7],
        )
        .unwrap();
        let got: Vec<(&str, f32)> = got.iter().map(|c| (c.label.as_str(), c.score)).collect();
        assert_eq!(
            got,
            [("positive", 0.7), ("negative", 0.2), ("neutral", 0.1)]
        );
    }

    #[test]
    fn ranked_top_k_cuts() {
        let got = ranked_top_k(&labels(&["a", "b", "c"]), &[0.2, 0.5, 0.3], 2).unwrap();
        let names: Vec<&str> = got.iter().map(|c| c.label.as_str()).collect();
        assert_eq!(names, ["b", "c"]);
    }

    #[test]
    fn ranked_rejects_mismatched_lengths() {
        let err = ranked(&labels(&["a", "b"]), &[1.0]).unwrap_err();
        assert!(matches!(err, Error::Internal(m) if m.contains("2 labels for 1 scores")));
    }
}
