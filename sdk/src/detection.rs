//! Object detection post-processing: boxes ([`BBox`]), intersection over union, per-class
//! non-maximum suppression ([`nms`]), and decoding of GFL heads (generalized focal loss, as in
//! NanoDet and GFL/GFLv2), whose boxes are distributions over discrete distances
//! ([`gfl_distance`], [`decode_gfl_level`]).

/// An axis-aligned box, corners in pixels (`xmin <= xmax`, `ymin <= ymax` for a proper box).
///
/// # Examples
///
/// ```
/// use kiln_sdk::detection::BBox;
///
/// let b = BBox::new(10.0, 20.0, 50.0, 40.0);
/// assert_eq!((b.xmax - b.xmin, b.ymax - b.ymin), (40.0, 20.0));
/// assert_eq!(b.area(), 800.0);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct BBox {
    /// Left edge.
    pub xmin: f32,
    /// Top edge.
    pub ymin: f32,
    /// Right edge.
    pub xmax: f32,
    /// Bottom edge.
    pub ymax: f32,
}

impl BBox {
    /// A box from its corners.
    ///
    /// # Examples
    ///
    /// ```
    /// use kiln_sdk::detection::BBox;
    ///
    /// let b = BBox::new(0.0, 0.0, 4.0, 2.0);
    /// assert_eq!(b.xmax, 4.0);
    /// assert_eq!(b.ymax, 2.0);
    /// ```
    pub fn new(xmin: f32, ymin: f32, xmax: f32, ymax: f32) -> Self {
        BBox {
            xmin,
            ymin,
            xmax,
            ymax,
        }
    }

    /// Width x height; 0 for an empty or inverted box.
    ///
    /// # Examples
    ///
    /// ```
    /// use kiln_sdk::detection::BBox;
    ///
    /// assert_eq!(BBox::new(0.0, 0.0, 4.0, 2.5).area(), 10.0);
    /// // Inverted (xmin > xmax): empty.
    /// assert_eq!(BBox::new(5.0, 0.0, 1.0, 2.0).area(), 0.0);
    /// ```
    pub fn area(&self) -> f32 {
        (self.xmax - self.xmin).max(0.0) * (self.ymax - self.ymin).max(0.0)
    }

    /// Intersection over union with `other`, in 0..=1; 0 when either box is empty.
    ///
    /// # Examples
    ///
    /// ```
    /// use kiln_sdk::detection::BBox;
    ///
    /// let a = BBox::new(0.0, 0.0, 10.0, 10.0);
    /// let b = BBox::new(5.0, 0.0, 15.0, 10.0);
    /// // Intersection 50, union 100 + 100 - 50 = 150.
    /// assert!((a.iou(&b) - 1.0 / 3.0).abs() < 1e-6);
    /// assert_eq!(a.iou(&a), 1.0);
    /// assert_eq!(a.iou(&BBox::new(20.0, 20.0, 30.0, 30.0)), 0.0);
    /// ```
    pub fn iou(&self, other: &BBox) -> f32 {
        let w = (self.xmax.min(other.xmax) - self.xmin.max(other.xmin)).max(0.0);
        let h = (self.ymax.min(other.ymax) - self.ymin.max(other.ymin)).max(0.0);
        let intersection = w * h;
        let union = self.area() + other.area() - intersection;
        if union > 0.0 {
            intersection / union
        } else {
            0.0
        }
    }

    /// The box with x scaled by `sx` and y by `sy` (from a model's input size back to the
    /// original image's: `sx = original_width / input_width`).
    ///
    /// # Examples
    ///
    /// ```
    /// use kiln_sdk::detection::BBox;
    ///
    /// // A box in a 416 x 416 model input, back to a 832 x 208 image.
    /// let (sx, sy) = (832.0 / 416.0, 208.0 / 416.0);
    /// let b = BBox::new(100.0, 100.0, 200.0, 300.0).scale(sx, sy);
    /// assert_eq!(b, BBox::new(200.0, 50.0, 400.0, 150.0));
    /// ```
    pub fn scale(&self, sx: f32, sy: f32) -> BBox {
        BBox::new(
            self.xmin * sx,
            self.ymin * sy,
            self.xmax * sx,
            self.ymax * sy,
        )
    }

    /// The box clipped to `[0, width] x [0, height]`.
    ///
    /// # Examples
    ///
    /// ```
    /// use kiln_sdk::detection::BBox;
    ///
    /// let b = BBox::new(-4.0, 10.0, 208.0, 420.0).clamp(200.0, 416.0);
    /// assert_eq!(b, BBox::new(0.0, 10.0, 200.0, 416.0));
    /// ```
    pub fn clamp(&self, width: f32, height: f32) -> BBox {
        BBox::new(
            self.xmin.clamp(0.0, width),
            self.ymin.clamp(0.0, height),
            self.xmax.clamp(0.0, width),
            self.ymax.clamp(0.0, height),
        )
    }
}

/// Intersection over union of two boxes (see [`BBox::iou`]).
///
/// # Examples
///
/// ```
/// use kiln_sdk::detection::{iou, BBox};
///
/// let a = BBox::new(0.0, 0.0, 10.0, 10.0);
/// let b = BBox::new(5.0, 5.0, 15.0, 15.0);
/// // Intersection 5 x 5 = 25, union 100 + 100 - 25 = 175.
/// assert!((iou(&a, &b) - 25.0 / 175.0).abs() < 1e-6);
/// ```
pub fn iou(a: &BBox, b: &BBox) -> f32 {
    a.iou(b)
}

/// One scored box of one class, before or after suppression.
///
/// # Examples
///
/// ```
/// use kiln_sdk::detection::{BBox, Candidate};
///
/// let labels = ["person", "bicycle", "car"];
/// let c = Candidate { class: 2, score: 0.87, bbox: BBox::new(12.0, 40.0, 96.0, 88.0) };
/// assert_eq!(labels[c.class], "car");
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    /// The class index (into the model's labels).
    pub class: usize,
    /// The class score (a probability for sigmoid/softmax heads).
    pub score: f32,
    /// The box.
    pub bbox: BBox,
}

/// Greedy non-maximum suppression, per class: candidates are taken in descending score order
/// and one is dropped when it overlaps an already kept candidate *of the same class* with IoU
/// strictly above `iou_threshold`. Returns the kept candidates, highest score first (ties keep
/// their input order).
///
/// NaN scores sort last (and are kept only if nothing suppresses them); filter them out before
/// if the model can produce them.
///
/// # Examples
///
/// ```
/// use kiln_sdk::detection::{nms, BBox, Candidate};
///
/// // A 10 x 10 box at `x`.
/// let candidate = |class, score, x| Candidate {
///     class,
///     score,
///     bbox: BBox::new(x, 0.0, x + 10.0, 10.0),
/// };
/// let kept = nms(
///     vec![
///         candidate(0, 0.6, 1.0), // IoU 0.82 with the 0.9 box of the same class: dropped
///         candidate(0, 0.9, 0.0),
///         candidate(1, 0.7, 0.0), // same place, another class: kept
///         candidate(0, 0.5, 5.0), // IoU 1/3 with the 0.9 box: kept
///     ],
///     0.5,
/// );
/// let kept: Vec<(usize, f32)> = kept.iter().map(|c| (c.class, c.score)).collect();
/// assert_eq!(kept, [(0, 0.9), (1, 0.7), (0, 0.5)]);
/// ```
pub fn nms(mut candidates: Vec<Candidate>, iou_threshold: f32) -> Vec<Candidate> {
    // Stable sort: equal scores keep the model's order, so the result is deterministic.
    candidates.sort_by(|a, b| b.score.total_cmp(&a.score));
    let mut kept: Vec<Candidate> = Vec::new();
    for candidate in candidates {
        let suppressed = kept
            .iter()
            .any(|k| k.class == candidate.class && k.bbox.iou(&candidate.bbox) > iou_threshold);
        if !suppressed {
            kept.push(candidate);
        }
    }
    kept
}

/// The expected value of a discrete distance distribution: softmax over `logits` (bin `i`
/// stands for distance `i`), then `sum(i * p_i)`. In bins; multiply by the stride for pixels.
/// 0 for an empty slice.
///
/// # Examples
///
/// ```
/// use kiln_sdk::detection::gfl_distance;
///
/// // Uniform over bins 0..=7: the mean distance, 3.5 bins.
/// assert!((gfl_distance(&[0.0; 8]) - 3.5).abs() < 1e-5);
/// // p = [1/4, 3/4] over bins 0 and 1: 0.75 bins (6 pixels at stride 8).
/// assert!((gfl_distance(&[0.0, 3f32.ln()]) * 8.0 - 6.0).abs() < 1e-5);
/// ```
pub fn gfl_distance(logits: &[f32]) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return 0.0;
    }
    let mut sum = 0.0f32;
    let mut weighted = 0.0f32;
    for (i, &logit) in logits.iter().enumerate() {
        // Subtracting the max keeps exp() from overflowing; the ratio is unchanged.
        let e = (logit - max).exp();
        sum += e;
        weighted += e * i as f32;
    }
    weighted / sum
}

/// The box of one GFL cell: `distribution` holds 4 x `bins` logits (left, top, right, bottom,
/// each `bins` long), whose expected distances times `stride` are the distances from the centre
/// (`cx`, `cy`) to the box's sides.
///
/// `distribution.len()` must be `4 * bins`; `None` otherwise.
///
/// # Examples
///
/// ```
/// use kiln_sdk::detection::{gfl_box, BBox};
///
/// // 2 bins per side, each side's logits sure of one bin: left 1, top 0, right 1, bottom 0.
/// let sure = 50.0;
/// let distribution = [0.0, sure, sure, 0.0, 0.0, sure, sure, 0.0];
/// let b = gfl_box(20.0, 12.0, &distribution, 2, 8.0).unwrap();
/// // Distances of 1 bin are 8 pixels at stride 8.
/// assert!((b.xmin - 12.0).abs() < 1e-4 && (b.xmax - 28.0).abs() < 1e-4);
/// assert!((b.ymin - 12.0).abs() < 1e-4 && (b.ymax - 12.0).abs() < 1e-4);
/// // Not 4 x bins logits: no box.
/// assert_eq!(gfl_box(20.0, 12.0, &distribution[..6], 2, 8.0), None);
/// ```
pub fn gfl_box(cx: f32, cy: f32, distribution: &[f32], bins: usize, stride: f32) -> Option<BBox> {
    if bins == 0 || distribution.len() != 4 * bins {
        return None;
    }
    let mut d = [0.0f32; 4];
    for (side, chunk) in d.iter_mut().zip(distribution.chunks_exact(bins)) {
        *side = gfl_distance(chunk) * stride;
    }
    Some(BBox::new(cx - d[0], cy - d[1], cx + d[2], cy + d[3]))
}

/// One output level (stride) of a GFL head, as NanoDet produces it: `scores` is
/// `[cells, classes]` (already activated), `distributions` is `[cells, 4 * bins]`, and cells are
/// the feature map's row-major grid of `columns` x (`cells / columns`) points.
///
/// # Examples
///
/// A NanoDet-Plus level at stride 8 of a 416 x 416 input, whose outputs were split into class
/// scores and distance logits:
///
/// ```
/// use kiln_sdk::detection::GflLevel;
///
/// let (classes, bins, stride) = (80, 8, 8.0);
/// let columns = 416 / 8;
/// let cells = columns * columns;
/// # let scores = vec![0.0f32; cells * classes];
/// # let distributions = vec![0.0f32; cells * 4 * bins];
/// let level = GflLevel {
///     scores: &scores,               // [cells, classes]
///     distributions: &distributions, // [cells, 4 * bins]
///     classes,
///     bins,
///     columns,
///     stride,
/// };
/// assert_eq!(level.scores.len() / level.classes, 52 * 52);
/// ```
#[derive(Debug, Clone, Copy)]
pub struct GflLevel<'a> {
    /// Class scores, row-major `[cells, classes]`.
    pub scores: &'a [f32],
    /// Distance logits, row-major `[cells, 4 * bins]`.
    pub distributions: &'a [f32],
    /// Classes per cell.
    pub classes: usize,
    /// Bins per side (NanoDet: `reg_max + 1` = 8 or 11).
    pub bins: usize,
    /// Cells per row of the feature map (`input_width / stride`).
    pub columns: usize,
    /// Pixels of the model's input per cell.
    pub stride: f32,
}

/// Decodes one [`GflLevel`]: for each cell, its best class; if that scores at least `threshold`,
/// a [`Candidate`] whose box is [`gfl_box`] around the cell's centre
/// (`((col + 0.5) * stride, (row + 0.5) * stride)`), in the model's input pixels.
///
/// Fails with a message if the slices' lengths do not agree with `classes`, `bins` and
/// `columns`.
///
/// # Examples
///
/// ```
/// use kiln_sdk::detection::{decode_gfl_level, nms, BBox, Candidate, GflLevel};
///
/// // A 2 x 2 grid at stride 10 with 2 classes; 1 bin per side, so every distance is 0 and each
/// // box is the point at its cell's centre.
/// let scores = [
///     0.1, 0.2, // cell (0, 0): below the threshold
///     0.9, 0.3, // cell (0, 1): class 0
///     0.0, 0.0, // cell (1, 0)
///     0.4, 0.6, // cell (1, 1): class 1
/// ];
/// let level = GflLevel {
///     scores: &scores,
///     distributions: &[0.0; 4 * 4],
///     classes: 2,
///     bins: 1,
///     columns: 2,
///     stride: 10.0,
/// };
/// let candidates = decode_gfl_level(&level, 0.5)?;
/// assert_eq!(
///     nms(candidates, 0.6),
///     [
///         Candidate { class: 0, score: 0.9, bbox: BBox::new(15.0, 5.0, 15.0, 5.0) },
///         Candidate { class: 1, score: 0.6, bbox: BBox::new(15.0, 15.0, 15.0, 15.0) },
///     ]
/// );
///
/// // Lengths that do not agree with `classes` and `bins`: an error.
/// let bad = GflLevel { distributions: &[0.0; 15], ..level };
/// assert!(decode_gfl_level(&bad, 0.5).is_err());
/// # Ok::<(), String>(())
/// ```
pub fn decode_gfl_level(level: &GflLevel<'_>, threshold: f32) -> Result<Vec<Candidate>, String> {
    let GflLevel {
        scores,
        distributions,
        classes,
        bins,
        columns,
        stride,
    } = *level;
    if classes == 0 || bins == 0 || columns == 0 {
        return Err(format!(
            "GFL level with {classes} classes, {bins} bins, {columns} columns"
        ));
    }
    let cells = scores.len() / classes;
    if scores.len() != cells * classes
        || distributions.len() != cells * 4 * bins
        || cells % columns != 0
    {
        return Err(format!(
            "GFL level: {} scores and {} distribution values do not make [cells, {classes}] and \
             [cells, {}] with {columns} cells per row",
            scores.len(),
            distributions.len(),
            4 * bins
        ));
    }
    let mut candidates = Vec::new();
    for (cell, (row_scores, distribution)) in scores
        .chunks_exact(classes)
        .zip(distributions.chunks_exact(4 * bins))
        .enumerate()
    {
        let Some((class, &score)) = row_scores
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
        else {
            continue;
        };
        // Written as `partial_cmp` so that a NaN score (incomparable) is dropped too.
        if score.partial_cmp(&threshold).is_none_or(|o| o.is_lt()) {
            continue;
        }
        let cx = ((cell % columns) as f32 + 0.5) * stride;
        let cy = ((cell / columns) as f32 + 0.5) * stride;
        if let Some(bbox) = gfl_box(cx, cy, distribution, bins, stride) {
            candidates.push(Candidate { class, score, bbox });
        }
    }
    Ok(candidates)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f32, b: f32) -> bool {
        (a - b).abs() < 1e-5
    }

    #[test]
    fn iou_of_hand_computed_boxes() {
        let a = BBox::new(0.0, 0.0, 10.0, 10.0);
        // Same box.
        assert!(close(a.iou(&a), 1.0));
        // Half overlap: intersection 50, union 150.
        let b = BBox::new(5.0, 0.0, 15.0, 10.0);
        assert!(close(iou(&a, &b), 1.0 / 3.0));
        // Corner overlap 5x5 = 25, union 100 + 100 - 25 = 175.
        let c = BBox::new(5.0, 5.0, 15.0, 15.0);
        assert!(close(a.iou(&c), 25.0 / 175.0));
        // Disjoint, touching, and empty boxes.
        assert_eq!(a.iou(&BBox::new(20.0, 20.0, 30.0, 30.0)), 0.0);
        assert_eq!(a.iou(&BBox::new(10.0, 0.0, 20.0, 10.0)), 0.0);
        assert_eq!(a.iou(&BBox::new(3.0, 3.0, 3.0, 3.0)), 0.0);
        assert_eq!(BBox::default().iou(&BBox::default()), 0.0);
        // Contained: 4 / 100.
        assert!(close(a.iou(&BBox::new(1.0, 1.0, 3.0, 3.0)), 0.04));
    }

    #[test]
    fn scales_and_clamps() {
        let b = BBox::new(-4.0, 10.0, 208.0, 420.0);
        assert_eq!(b.scale(2.0, 0.5), BBox::new(-8.0, 5.0, 416.0, 210.0));
        assert_eq!(b.clamp(200.0, 416.0), BBox::new(0.0, 10.0, 200.0, 416.0));
    }

    fn candidate(class: usize, score: f32, x: f32) -> Candidate {
        Candidate {
            class,
            score,
            bbox: BBox::new(x, 0.0, x + 10.0, 10.0),
        }
    }

    #[test]
    fn nms_keeps_the_best_of_overlapping_boxes_per_class() {
        let kept = nms(
            vec![
                candidate(0, 0.6, 1.0),  // IoU 9/11 = 0.82 with the 0.9 box: suppressed
                candidate(0, 0.9, 0.0),  // kept
                candidate(0, 0.5, 5.0),  // IoU 1/3 with the 0.9 box: kept
                candidate(1, 0.7, 0.0),  // another class: kept despite IoU 1
                candidate(0, 0.8, 30.0), // elsewhere: kept
            ],
            0.5,
        );
        let got: Vec<(usize, f32)> = kept.iter().map(|c| (c.class, c.score)).collect();
        assert_eq!(got, [(0, 0.9), (0, 0.8), (1, 0.7), (0, 0.5)]);
    }

    #[test]
    fn nms_suppresses_only_above_the_threshold() {
        // IoU exactly 1/3: kept at threshold 1/3, suppressed below it.
        let pair = vec![candidate(0, 0.9, 0.0), candidate(0, 0.8, 5.0)];
        assert_eq!(nms(pair.clone(), 1.0 / 3.0).len(), 2);
        assert_eq!(nms(pair, 0.3).len(), 1);
        assert!(nms(Vec::new(), 0.5).is_empty());
    }

    #[test]
    fn nms_is_greedy_not_transitive() {
        // A suppresses B, B would suppress C, but B is gone: C stays (IoU(A, C) = 0.25).
        let a = candidate(0, 0.9, 0.0);
        let b = candidate(0, 0.8, 3.0);
        let c = candidate(0, 0.7, 6.0);
        let kept = nms(vec![c, b, a], 0.4);
        assert_eq!(kept, [a, c]);
    }

    #[test]
    fn gfl_distance_is_the_softmax_expectation() {
        // Equal logits over 11 bins: uniform, mean of 0..=10 = 5.
        assert!(close(gfl_distance(&[0.3; 11]), 5.0));
        // Logits ln(1), ln(3) over 2 bins: p = 1/4, 3/4, expectation 0.75.
        assert!(close(gfl_distance(&[0.0, 3.0f32.ln()]), 0.75));
        // One dominant bin.
        let mut logits = [0.0f32; 8];
        logits[6] = 100.0;
        assert!(close(gfl_distance(&logits), 6.0));
        // Large logits do not overflow.
        assert!(close(gfl_distance(&[1000.0, 1000.0]), 0.5));
        assert_eq!(gfl_distance(&[]), 0.0);
    }

    #[test]
    fn gfl_box_is_centre_minus_left_top_plus_right_bottom() {
        // 2 bins per side: left all on bin 1 (1.0), top uniform (0.5), right on bin 0 (0),
        // bottom p = 1/4, 3/4 (0.75). Stride 8, centre (20, 12).
        let big = 50.0;
        let distribution = [0.0, big, 0.0, 0.0, big, 0.0, 0.0, 3.0f32.ln()];
        let b = gfl_box(20.0, 12.0, &distribution, 2, 8.0).unwrap();
        assert!(close(b.xmin, 12.0), "{b:?}");
        assert!(close(b.ymin, 8.0), "{b:?}");
        assert!(close(b.xmax, 20.0), "{b:?}");
        assert!(close(b.ymax, 18.0), "{b:?}");
        assert!(gfl_box(0.0, 0.0, &distribution, 3, 8.0).is_none());
    }

    #[test]
    fn decodes_a_level() {
        // A 2x2 grid, stride 10, 2 classes, 1 bin per side (every distance is 0: point boxes
        // at the cell centres).
        let scores = [0.1, 0.2, 0.9, 0.3, 0.0, 0.0, 0.4, 0.6];
        let distributions = [0.0; 4 * 4];
        let level = GflLevel {
            scores: &scores,
            distributions: &distributions,
            classes: 2,
            bins: 1,
            columns: 2,
            stride: 10.0,
        };
        let got = decode_gfl_level(&level, 0.5).unwrap();
        assert_eq!(
            got,
            [
                Candidate {
                    class: 0,
                    score: 0.9,
                    bbox: BBox::new(15.0, 5.0, 15.0, 5.0)
                },
                Candidate {
                    class: 1,
                    score: 0.6,
                    bbox: BBox::new(15.0, 15.0, 15.0, 15.0)
                },
            ]
        );
        let bad = GflLevel {
            distributions: &distributions[..15],
            ..level
        };
        assert!(decode_gfl_level(&bad, 0.5).is_err());
    }
}
