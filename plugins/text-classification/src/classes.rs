//! From the graph's output to the task's answer: one ranked list of [`ClassScore`] per input.

use kiln_sdk::scores;
use kiln_sdk::{ClassScore, Error};

/// Where the scores come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScoreSource {
    /// Softmax (in the plugin) of a logits output.
    Softmax,
    /// An output that already holds probabilities, used as it is.
    Probabilities,
}

impl ScoreSource {
    /// The value of the `scores` config key.
    pub fn parse(value: &str) -> Result<Self, Error> {
        match value {
            "softmax" => Ok(ScoreSource::Softmax),
            "probabilities" => Ok(ScoreSource::Probabilities),
            other => Err(Error::internal(format!(
                "plugin config `scores` must be \"softmax\" or \"probabilities\", got {other:?}"
            ))),
        }
    }

    /// The graph output read by default: `logits` for softmax, else `probabilities`.
    pub fn default_output(self) -> &'static str {
        match self {
            ScoreSource::Softmax => "logits",
            ScoreSource::Probabilities => "probabilities",
        }
    }
}

/// Splits a `[batch, labels]` output into one list per input holding every label, highest
/// score first. With [`ScoreSource::Softmax`] each row goes through [`scores::softmax`].
///
/// A shape other than `[batch, labels.len()]`, or a score that is not a finite number, is the
/// model's fault: an [`Error::Internal`] that says which.
pub fn rank_rows(
    values: &[f32],
    shape: &[u32],
    batch: usize,
    labels: &[String],
    source: ScoreSource,
) -> Result<Vec<Vec<ClassScore>>, Error> {
    let classes = labels.len();
    let shape_ok = matches!(shape, [b, c] if *b as usize == batch && *c as usize == classes);
    if !shape_ok || values.len() != batch * classes {
        return Err(Error::internal(format!(
            "output has shape {shape:?} ({} values), expected [{batch}, {classes}] \
             ({classes} labels)",
            values.len()
        )));
    }
    values
        .chunks_exact(classes)
        .enumerate()
        .map(|(i, row)| {
            let row = match source {
                ScoreSource::Softmax => scores::softmax(row),
                ScoreSource::Probabilities => row.to_vec(),
            };
            if let Some(bad) = row.iter().find(|v| !v.is_finite()) {
                return Err(Error::internal(format!(
                    "input {i}: the model gave a score of {bad}"
                )));
            }
            scores::ranked(labels, &row)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sentiment_labels() -> Vec<String> {
        ["negative", "neutral", "positive"].map(String::from).into()
    }

    fn names(list: &[ClassScore]) -> Vec<&str> {
        list.iter().map(|c| c.label.as_str()).collect()
    }

    #[test]
    fn parses_score_sources() {
        assert_eq!(ScoreSource::parse("softmax").unwrap(), ScoreSource::Softmax);
        assert_eq!(
            ScoreSource::parse("probabilities")
                .unwrap()
                .default_output(),
            "probabilities"
        );
        assert!(ScoreSource::parse("sigmoid").is_err());
    }

    #[test]
    fn ranks_softmax_rows() {
        // The sentiment model's logits for sentences 0 and 1 of the reference (tests/reference/
        // sentiment_reference.json), whose `probabilities` output is
        // [0.007979165, 0.026529845, 0.9654911] and [0.8865823, 0.07423967, 0.03917797].
        let logits = [
            -1.999_169_8,
            -0.797_733_2,
            2.796_633_2,
            1.866_354_7,
            -0.613_720_6,
            -1.252_904_7,
        ];
        let rows = rank_rows(
            &logits,
            &[2, 3],
            2,
            &sentiment_labels(),
            ScoreSource::Softmax,
        )
        .unwrap();
        assert_eq!(names(&rows[0]), ["positive", "neutral", "negative"]);
        assert_eq!(names(&rows[1]), ["negative", "neutral", "positive"]);
        assert!((rows[0][0].score - 0.965_491_1).abs() < 1e-6);
        assert!((rows[1][0].score - 0.886_582_3).abs() < 1e-6);
        for row in &rows {
            let sum: f32 = row.iter().map(|c| c.score).sum();
            assert!((sum - 1.0).abs() < 1e-6);
        }
    }

    #[test]
    fn takes_probabilities_as_they_are() {
        let rows = rank_rows(
            &[0.2, 0.3, 0.5],
            &[1, 3],
            1,
            &sentiment_labels(),
            ScoreSource::Probabilities,
        )
        .unwrap();
        let got: Vec<(&str, f32)> = rows[0]
            .iter()
            .map(|c| (c.label.as_str(), c.score))
            .collect();
        assert_eq!(
            got,
            [("positive", 0.5), ("neutral", 0.3), ("negative", 0.2)]
        );
    }

    #[test]
    fn rejects_a_shape_that_does_not_match_the_labels() {
        let labels = sentiment_labels();
        for (values, shape) in [(&[0.0; 4][..], [2, 2]), (&[0.0; 3][..], [1, 3])] {
            let err = rank_rows(values, &shape, 2, &labels, ScoreSource::Softmax).unwrap_err();
            assert!(
                matches!(&err, Error::Internal(m) if m.contains("expected [2, 3]")),
                "{err:?}"
            );
        }
    }

    #[test]
    fn rejects_non_finite_scores() {
        let err = rank_rows(
            &[0.1, f32::NAN, 0.2],
            &[1, 3],
            1,
            &sentiment_labels(),
            ScoreSource::Softmax,
        )
        .unwrap_err();
        assert!(
            matches!(&err, Error::Internal(m) if m.contains("NaN")),
            "{err:?}"
        );
    }
}
