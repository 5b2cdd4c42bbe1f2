//! Pooling token states into one vector per input, and normalisation.

/// How token states become one vector per input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    /// The mean over the tokens whose attention mask is 1.
    Mean,
    /// The first token's state (`[CLS]`).
    Cls,
}

/// Pools `states` (row-major `[batch, seq, hidden]`) with `mask` (`[batch, seq]`, 1 for a real
/// token) into `batch` vectors of `hidden` values.
///
/// Mean pooling of an input without any real token gives a zero vector.
pub fn pool(
    states: &[f32],
    mask: &[i64],
    seq: usize,
    hidden: usize,
    pooling: Pooling,
) -> Vec<Vec<f32>> {
    if seq == 0 || hidden == 0 {
        return Vec::new();
    }
    states
        .chunks_exact(seq * hidden)
        .zip(mask.chunks_exact(seq))
        .map(|(tokens, mask)| match pooling {
            Pooling::Cls => tokens[..hidden].to_vec(),
            Pooling::Mean => {
                let mut sum = vec![0f32; hidden];
                let mut count = 0usize;
                for (token, _) in tokens
                    .chunks_exact(hidden)
                    .zip(mask)
                    .filter(|(_, &m)| m == 1)
                {
                    sum.iter_mut().zip(token).for_each(|(s, v)| *s += v);
                    count += 1;
                }
                // As sentence-transformers: divide by max(count, 1e-9).
                let count = (count as f32).max(1e-9);
                sum.iter_mut().for_each(|s| *s /= count);
                sum
            }
        })
        .collect()
}

/// Scales `v` to unit L2 norm (a zero vector stays zero).
pub fn l2_normalize(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    v.iter_mut().for_each(|x| *x /= norm);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &[f32], b: &[f32]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-6)
    }

    // batch 2, seq 3, hidden 2
    const STATES: [f32; 12] = [
        1.0, 2.0, 3.0, 4.0, 100.0, 100.0, // input 0: last token is padding
        5.0, 6.0, 7.0, 8.0, 9.0, 10.0, // input 1: no padding
    ];
    const MASK: [i64; 6] = [1, 1, 0, 1, 1, 1];

    #[test]
    fn mean_ignores_padding() {
        let pooled = pool(&STATES, &MASK, 3, 2, Pooling::Mean);
        assert_eq!(pooled.len(), 2);
        assert!(close(&pooled[0], &[2.0, 3.0]));
        assert!(close(&pooled[1], &[7.0, 8.0]));
    }

    #[test]
    fn cls_takes_first_token() {
        let pooled = pool(&STATES, &MASK, 3, 2, Pooling::Cls);
        assert!(close(&pooled[0], &[1.0, 2.0]));
        assert!(close(&pooled[1], &[5.0, 6.0]));
    }

    #[test]
    fn mean_of_all_padding_is_zero() {
        let pooled = pool(&[1.0, 2.0, 3.0, 4.0], &[0, 0], 2, 2, Pooling::Mean);
        assert!(close(&pooled[0], &[0.0, 0.0]));
    }

    #[test]
    fn normalizes_to_unit_length() {
        let mut v = vec![3.0, 4.0];
        l2_normalize(&mut v);
        assert!(close(&v, &[0.6, 0.8]));
        let mut zero = vec![0.0, 0.0];
        l2_normalize(&mut zero);
        assert!(close(&zero, &[0.0, 0.0]));
    }
}
