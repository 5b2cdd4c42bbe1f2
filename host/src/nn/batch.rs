//! Cross-request batching: concurrent `compute` calls on one graph merged into one ORT run.
//!
//! A graph opts in from its `model.toml` ([`BatchSpec`]):
//!
//! ```toml
//! [graphs.model]
//! file = "model.onnx"
//! [graphs.model.batch]
//! axis = 0                 # the batch axis of every input and output (default 0)
//! max_size = 32            # rows of one merged run (default 32)
//! max_wait_us = 0          # how long a worker that already holds 2+ jobs waits for more
//! max_padding = 0.1        # largest share of padding in a merged run (default 0.1)
//! # inputs whose length may differ between calls: the axis padded to the longest, and the value
//! pad = { input_ids = { axis = 1, value = 0 }, attention_mask = { axis = 1, value = 0 } }
//! # outputs with an axis that follows the padded length: cut back to each call's own length
//! outputs = { last_hidden_state = 1 }   # or { axis = 1, input = "input_ids" }
//! ```
//!
//! Two calls merge only when they give the same inputs with the same element types and the same
//! dimensions everywhere except the batch axis and each input's pad axis. The merged inputs are
//! the calls' rows one after the other, padded to the longest; each output is split back by rows
//! and, where it declares a following axis, cut back to the call's own length. A graph that
//! treats padding correctly (an attention mask) gives every call exactly what it would get alone.
//!
//! [`BatchSpec`] is what `model.toml` says (checked where it is parsed); [`BatchPlan`] is that
//! declaration checked against the graph's inputs and outputs when the model loads; the executor
//! uses the plan to key, merge and split jobs.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::executor::IoSpec;
use super::tensor::{DType, Tensor};

// What `model.toml` declares, and its checks, are kiln-wire's (fuzzed with the rest of
// model.toml: `fuzz/`).
pub use kiln_wire::model_file::{BatchSpec, FollowSpec, PadSpec, PadValue};

/// One input as the plan sees it.
#[derive(Debug, Clone)]
struct InputRule {
    name: String,
    /// The padding axis and one element of padding, little-endian.
    pad: Option<(usize, Vec<u8>)>,
}

/// One output as the plan sees it.
#[derive(Debug, Clone)]
struct OutputRule {
    /// Following axis and the index (in the plan's inputs) of the padded input it follows;
    /// None for the common length of all padded inputs.
    follow: Option<(usize, Option<usize>)>,
}

/// A [`BatchSpec`] checked against a graph: how its jobs are keyed, merged and split.
#[derive(Debug, Clone)]
pub struct BatchPlan {
    pub axis: usize,
    pub max_size: usize,
    pub max_wait: Duration,
    pub max_padding: f64,
    /// Sorted by name (jobs' inputs are sorted the same way).
    inputs: Vec<InputRule>,
    outputs: BTreeMap<String, OutputRule>,
    /// Whether some output follows the common padded length.
    needs_common_len: bool,
}

impl BatchPlan {
    /// Checks `spec` against the graph's inputs and outputs; the message names the field.
    pub fn new(spec: &BatchSpec, inputs: &[IoSpec], outputs: &[IoSpec]) -> anyhow::Result<Self> {
        let fail = |field: &str, message: String| {
            let origin = if spec.origin.is_empty() {
                "field `batch".to_owned()
            } else {
                spec.origin.clone()
            };
            let sep = if field.is_empty() { "" } else { "." };
            anyhow::anyhow!("{origin}{sep}{field}`: {message}")
        };
        spec.check().map_err(|(field, m)| fail(&field, m))?;
        let axis = spec.axis;
        let mut rules = Vec::new();
        let mut sorted: Vec<&IoSpec> = inputs.iter().collect();
        sorted.sort_by(|a, b| a.name.cmp(&b.name));
        for io in &sorted {
            let Some(dtype) = io.dtype else {
                return Err(fail(
                    "",
                    format!(
                        "input '{}' has an element type wasi:nn cannot carry",
                        io.name
                    ),
                ));
            };
            if io.shape.len() <= axis || io.shape[axis] >= 0 {
                return Err(fail(
                    "axis",
                    format!(
                        "input '{}' (shape {}) has no dynamic dimension at the batch axis {axis}",
                        io.name,
                        io.describe_shape()
                    ),
                ));
            }
            let pad = match spec.pad.get(&io.name) {
                None => None,
                Some(p) => {
                    let field = format!("pad.{}", io.name);
                    if io.shape.len() <= p.axis || io.shape[p.axis] >= 0 {
                        return Err(fail(
                            &format!("{field}.axis"),
                            format!(
                                "input '{}' (shape {}) has no dynamic dimension at axis {}",
                                io.name,
                                io.describe_shape(),
                                p.axis
                            ),
                        ));
                    }
                    let bytes = pad_bytes(p.value, dtype)
                        .map_err(|m| fail(&format!("{field}.value"), m))?;
                    Some((p.axis, bytes))
                }
            };
            rules.push(InputRule {
                name: io.name.clone(),
                pad,
            });
        }
        for name in spec.pad.keys() {
            if !inputs.iter().any(|io| &io.name == name) {
                let known: Vec<&str> = inputs.iter().map(|io| io.name.as_str()).collect();
                return Err(fail(
                    &format!("pad.{name}"),
                    format!(
                        "the graph has no input named '{name}'; its inputs are: {}",
                        known.join(", ")
                    ),
                ));
            }
        }
        let mut out_rules = BTreeMap::new();
        for io in outputs {
            if io.shape.len() <= axis || io.shape[axis] >= 0 {
                return Err(fail(
                    "axis",
                    format!(
                        "output '{}' (shape {}) has no dynamic dimension at the batch axis {axis}",
                        io.name,
                        io.describe_shape()
                    ),
                ));
            }
            let follow = match spec.outputs.get(&io.name) {
                None => None,
                Some(f) => {
                    let a = f.axis();
                    if io.shape.len() <= a || io.shape[a] >= 0 {
                        return Err(fail(
                            &format!("outputs.{}", io.name),
                            format!(
                                "output '{}' (shape {}) has no dynamic dimension at axis {a}",
                                io.name,
                                io.describe_shape()
                            ),
                        ));
                    }
                    let input = f
                        .input()
                        .map(|n| rules.iter().position(|r| r.name == n).unwrap_or(0));
                    Some((a, input))
                }
            };
            out_rules.insert(io.name.clone(), OutputRule { follow });
        }
        for name in spec.outputs.keys() {
            if !outputs.iter().any(|io| &io.name == name) {
                let known: Vec<&str> = outputs.iter().map(|io| io.name.as_str()).collect();
                return Err(fail(
                    &format!("outputs.{name}"),
                    format!(
                        "the graph has no output named '{name}'; its outputs are: {}",
                        known.join(", ")
                    ),
                ));
            }
        }
        let needs_common_len = out_rules
            .values()
            .any(|o| matches!(o.follow, Some((_, None))));
        Ok(Self {
            axis,
            max_size: spec.max_size,
            max_wait: spec.max_wait(),
            max_padding: spec.max_padding,
            inputs: rules,
            outputs: out_rules,
            needs_common_len,
        })
    }

    /// The key of a job whose inputs (checked against the graph, sorted by name) are `inputs`;
    /// None when the job cannot be merged (its inputs disagree on rows, it has no rows, or its
    /// padded inputs disagree on a length that an output follows).
    pub(crate) fn key(&self, inputs: &[(String, Tensor)]) -> Option<BatchKey> {
        if inputs.len() != self.inputs.len() {
            return None;
        }
        let rows = *inputs.first()?.1.dims.get(self.axis)?;
        if rows == 0 {
            return None;
        }
        let mut shape = Vec::with_capacity(inputs.len());
        let mut lens = Vec::with_capacity(inputs.len());
        let mut weights = Vec::with_capacity(inputs.len());
        for ((name, t), rule) in inputs.iter().zip(&self.inputs) {
            if name != &rule.name || t.dims.get(self.axis) != Some(&rows) {
                return None;
            }
            let mut dims = t.dims.clone();
            dims[self.axis] = 0;
            let (len, weight) = match &rule.pad {
                Some((p, _)) => {
                    let len = *t.dims.get(*p)?;
                    dims[*p] = 0;
                    // Elements per row and unit of length.
                    let weight = t
                        .dims
                        .iter()
                        .enumerate()
                        .filter(|&(i, _)| i != self.axis && i != *p)
                        .map(|(_, &d)| u64::from(d))
                        .product::<u64>();
                    (len, weight)
                }
                None => (0, 0),
            };
            lens.push(len);
            weights.push(weight);
            shape.push((t.dtype, dims));
        }
        if self.needs_common_len {
            let mut padded = self
                .inputs
                .iter()
                .zip(&lens)
                .filter(|(r, _)| r.pad.is_some())
                .map(|(_, &l)| l);
            let first = padded.next()?;
            if padded.any(|l| l != first) {
                return None;
            }
        }
        Some(BatchKey {
            rows,
            lens,
            weights,
            shape,
        })
    }

    /// A batch that holds only the job of `first`.
    pub(crate) fn start(&self, first: &BatchKey) -> Fill {
        Fill {
            rows: u64::from(first.rows),
            real: first.cells(),
            lens: first.lens.clone(),
        }
    }

    /// `fill` with the job of `key` added, if it merges with `first`, fits in `max_rows` and
    /// keeps the padding within `max_padding`.
    pub(crate) fn add(
        &self,
        fill: &Fill,
        first: &BatchKey,
        key: &BatchKey,
        max_rows: usize,
    ) -> Option<Fill> {
        if !key.merges_with(first) {
            return None;
        }
        let rows = fill.rows + u64::from(key.rows);
        if rows > max_rows as u64 {
            return None;
        }
        let lens: Vec<u32> = fill
            .lens
            .iter()
            .zip(&key.lens)
            .map(|(&a, &b)| a.max(b))
            .collect();
        let real = fill.real + key.cells();
        let padded: u64 = rows
            * lens
                .iter()
                .zip(&first.weights)
                .map(|(&l, &w)| u64::from(l) * w)
                .sum::<u64>();
        if padded > 0 && (padded - real.min(padded)) as f64 > self.max_padding * padded as f64 {
            return None;
        }
        Some(Fill { rows, real, lens })
    }

    /// The inputs of one merged run: each input's jobs one after the other along the batch axis,
    /// padded to the longest along its pad axis. `jobs` all have keys equal in shape.
    pub(crate) fn merge(&self, jobs: &[(&BatchKey, &[(String, Tensor)])]) -> Merged {
        let total_rows: u32 = jobs.iter().map(|(k, _)| k.rows).sum();
        let mut lens = vec![0u32; self.inputs.len()];
        for (k, _) in jobs {
            for (m, &l) in lens.iter_mut().zip(&k.lens) {
                *m = (*m).max(l);
            }
        }
        let mut inputs = Vec::with_capacity(self.inputs.len());
        for (i, rule) in self.inputs.iter().enumerate() {
            let first = &jobs[0].1[i].1;
            let mut dims = first.dims.clone();
            dims[self.axis] = total_rows;
            if let Some((p, _)) = &rule.pad {
                dims[*p] = lens[i];
            }
            let size = first.dtype.size();
            let count = Tensor::element_count(&dims).unwrap_or(0);
            let mut data = match &rule.pad {
                Some((_, one)) if one.iter().any(|&b| b != 0) => one.repeat(count),
                _ => vec![0u8; count * size],
            };
            let mut row = 0u32;
            for (k, job_inputs) in jobs {
                let t = &job_inputs[i].1;
                let mut origin = vec![0u32; dims.len()];
                origin[self.axis] = row;
                copy_region(
                    &t.data,
                    &t.dims,
                    &vec![0; t.dims.len()],
                    &mut data,
                    &dims,
                    &origin,
                    &t.dims,
                    size,
                );
                row += k.rows;
            }
            inputs.push((rule.name.clone(), Tensor::new(dims, first.dtype, data)));
        }
        let common_len = self
            .inputs
            .iter()
            .zip(&lens)
            .find(|(r, _)| r.pad.is_some())
            .map_or(0, |(_, &l)| l);
        Merged {
            inputs,
            total_rows,
            lens,
            common_len,
        }
    }

    /// Splits a merged run's outputs back into each job's, by rows and, for a following axis,
    /// cut back to the job's own length. Err when an output does not have the shape batching
    /// expects (the merged run is then not trusted).
    pub(crate) fn split(
        &self,
        merged: &Merged,
        keys: &[&BatchKey],
        outputs: Vec<(String, Tensor)>,
    ) -> Result<Vec<Vec<(String, Tensor)>>, String> {
        let mut per_job: Vec<Vec<(String, Tensor)>> = keys
            .iter()
            .map(|_| Vec::with_capacity(outputs.len()))
            .collect();
        for (name, out) in outputs {
            let follow = self.outputs.get(&name).and_then(|r| r.follow);
            if out.dims.get(self.axis) != Some(&merged.total_rows) {
                return Err(format!(
                    "output '{name}' has shape {:?}: expected {} rows on the batch axis {}",
                    out.dims, merged.total_rows, self.axis
                ));
            }
            let merged_len = follow.map(|(a, input)| {
                let len = input.map_or(merged.common_len, |i| merged.lens[i]);
                (a, len)
            });
            if let Some((a, len)) = merged_len {
                if out.dims.get(a) != Some(&len) {
                    return Err(format!(
                        "output '{name}' has shape {:?}: expected the padded length {len} on axis {a}",
                        out.dims
                    ));
                }
            }
            let size = out.dtype.size();
            let mut row = 0u32;
            for (j, key) in keys.iter().enumerate() {
                let mut dims = out.dims.clone();
                dims[self.axis] = key.rows;
                if let Some((a, input)) = follow {
                    dims[a] = match input {
                        Some(i) => key.lens[i],
                        None => key.common_len(self),
                    };
                }
                let mut origin = vec![0u32; dims.len()];
                origin[self.axis] = row;
                let count = Tensor::element_count(&dims).unwrap_or(0);
                let mut data = vec![0u8; count * size];
                copy_region(
                    &out.data,
                    &out.dims,
                    &origin,
                    &mut data,
                    &dims,
                    &vec![0; dims.len()],
                    &dims,
                    size,
                );
                per_job[j].push((name.clone(), Tensor::new(dims, out.dtype, data)));
                row += key.rows;
            }
        }
        Ok(per_job)
    }
}

/// What decides whether two jobs can share a run: equal `shape`s merge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BatchKey {
    /// Size of the batch axis.
    pub rows: u32,
    /// Per input (the plan's order): the length of its pad axis, 0 for an input without one.
    lens: Vec<u32>,
    /// Per input: elements of a row per unit of its pad axis (0 for an input without one).
    weights: Vec<u64>,
    /// Per input: element type and dimensions with the batch and pad axes zeroed.
    shape: Vec<(DType, Vec<u32>)>,
}

impl BatchKey {
    pub fn merges_with(&self, other: &BatchKey) -> bool {
        self.shape == other.shape
    }

    /// Elements of the padded inputs, all rows.
    fn cells(&self) -> u64 {
        u64::from(self.rows)
            * self
                .lens
                .iter()
                .zip(&self.weights)
                .map(|(&l, &w)| u64::from(l) * w)
                .sum::<u64>()
    }

    /// How far this job's lengths are from `other`'s (merging the closest first wastes least).
    pub fn distance(&self, other: &BatchKey) -> u64 {
        self.lens
            .iter()
            .zip(&other.lens)
            .map(|(&a, &b)| u64::from(a.abs_diff(b)))
            .sum()
    }

    fn common_len(&self, plan: &BatchPlan) -> u32 {
        plan.inputs
            .iter()
            .zip(&self.lens)
            .find(|(r, _)| r.pad.is_some())
            .map_or(0, |(_, &l)| l)
    }
}

/// A batch being gathered: its rows, the elements of its padded inputs before padding, and
/// the padded lengths.
#[derive(Debug, Clone)]
pub(crate) struct Fill {
    pub rows: u64,
    real: u64,
    lens: Vec<u32>,
}

/// The inputs of a merged run and what splitting needs to know.
#[derive(Debug)]
pub(crate) struct Merged {
    pub inputs: Vec<(String, Tensor)>,
    pub total_rows: u32,
    /// Per input: the padded length (max over the jobs).
    lens: Vec<u32>,
    common_len: u32,
}

/// One element of `value` in `dtype`, little-endian; Err when it does not fit.
fn pad_bytes(value: PadValue, dtype: DType) -> Result<Vec<u8>, String> {
    let int = |lo: i64, hi: i64| match value {
        PadValue::Int(v) if (lo..=hi).contains(&v) => Ok(v),
        PadValue::Int(v) => Err(format!("{v} does not fit the input's type {dtype}")),
        PadValue::Float(v) => Err(format!(
            "the input's type is {dtype}: the pad value must be an integer, got {v}"
        )),
    };
    let float = match value {
        PadValue::Int(v) => v as f64,
        PadValue::Float(v) => v,
    };
    Ok(match dtype {
        DType::U8 => vec![int(0, 255)? as u8],
        DType::I32 => (int(i32::MIN.into(), i32::MAX.into())? as i32)
            .to_le_bytes()
            .to_vec(),
        DType::I64 => int(i64::MIN, i64::MAX)?.to_le_bytes().to_vec(),
        DType::F16 => half::f16::from_f64(float).to_le_bytes().to_vec(),
        DType::Bf16 => half::bf16::from_f64(float).to_le_bytes().to_vec(),
        DType::F32 => (float as f32).to_le_bytes().to_vec(),
        DType::F64 => float.to_le_bytes().to_vec(),
    })
}

/// Copies the block `region` (dims) from `src` (dims `src_dims`, starting at `src_origin`) into
/// `dst` (dims `dst_dims`, starting at `dst_origin`). Row-major, `size` bytes per element. The
/// region fits both tensors (the caller's shapes guarantee it).
#[allow(clippy::too_many_arguments)]
fn copy_region(
    src: &[u8],
    src_dims: &[u32],
    src_origin: &[u32],
    dst: &mut [u8],
    dst_dims: &[u32],
    dst_origin: &[u32],
    region: &[u32],
    size: usize,
) {
    let rank = region.len();
    if rank == 0 {
        dst[..size].copy_from_slice(&src[..size]);
        return;
    }
    if region.contains(&0) {
        return;
    }
    let strides = |dims: &[u32]| {
        let mut s = vec![1usize; dims.len()];
        for i in (0..dims.len().saturating_sub(1)).rev() {
            s[i] = s[i + 1] * dims[i + 1] as usize;
        }
        s
    };
    let (ss, ds) = (strides(src_dims), strides(dst_dims));
    // The trailing axes where the region spans both tensors whole (and starts at 0) are one
    // contiguous block; the axis before them is a contiguous run too.
    let mut k = rank - 1;
    while k > 0
        && region[k] == src_dims[k]
        && region[k] == dst_dims[k]
        && src_origin[k] == 0
        && dst_origin[k] == 0
    {
        k -= 1;
    }
    let run = region[k] as usize * ss[k] * size;
    debug_assert_eq!(ss[k], ds[k]);
    let mut index = vec![0u32; k];
    loop {
        let mut s = src_origin[k] as usize * ss[k];
        let mut d = dst_origin[k] as usize * ds[k];
        for i in 0..k {
            s += (src_origin[i] + index[i]) as usize * ss[i];
            d += (dst_origin[i] + index[i]) as usize * ds[i];
        }
        dst[d * size..d * size + run].copy_from_slice(&src[s * size..s * size + run]);
        // Next index over the outer axes 0..k.
        let mut i = k;
        loop {
            if i == 0 {
                return;
            }
            i -= 1;
            index[i] += 1;
            if index[i] < region[i] {
                break;
            }
            index[i] = 0;
        }
    }
}

/// Totals of merged runs across the process, for `/metrics`.
#[derive(Debug, Default)]
pub struct BatchTotals {
    runs: AtomicU64,
    jobs: AtomicU64,
    largest: AtomicU64,
}

impl BatchTotals {
    /// ORT runs that merged two or more `compute` calls.
    pub fn runs(&self) -> u64 {
        self.runs.load(Ordering::Relaxed)
    }

    /// `compute` calls answered by merged runs.
    pub fn jobs(&self) -> u64 {
        self.jobs.load(Ordering::Relaxed)
    }

    /// Most `compute` calls merged into one run.
    pub fn largest(&self) -> u64 {
        self.largest.load(Ordering::Relaxed)
    }

    pub(crate) fn record(&self, jobs: usize) {
        self.runs.fetch_add(1, Ordering::Relaxed);
        self.jobs.fetch_add(jobs as u64, Ordering::Relaxed);
        self.largest.fetch_max(jobs as u64, Ordering::Relaxed);
    }
}

/// Merged runs of every graph of this process (ORT's environment is per process too).
pub static TOTALS: BatchTotals = BatchTotals {
    runs: AtomicU64::new(0),
    jobs: AtomicU64::new(0),
    largest: AtomicU64::new(0),
};

#[cfg(test)]
mod tests {
    use super::*;

    fn io(name: &str, dtype: DType, shape: &[i64]) -> IoSpec {
        IoSpec {
            name: name.into(),
            dtype: Some(dtype),
            shape: shape.to_vec(),
        }
    }

    fn spec(toml_text: &str) -> BatchSpec {
        toml::from_str(toml_text).unwrap()
    }

    fn i64s(dims: &[u32], values: &[i64]) -> Tensor {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Tensor::new(dims.to_vec(), DType::I64, bytes)
    }

    fn f32s(t: &Tensor) -> Vec<f32> {
        t.data
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }

    fn i64_values(t: &Tensor) -> Vec<i64> {
        t.data
            .chunks(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }

    fn bert_plan() -> BatchPlan {
        let s = spec(
            "max_size = 8\npad = { ids = { axis = 1, value = 0 }, mask = { axis = 1 } }\n\
             outputs = { hidden = 1 }\n",
        );
        BatchPlan::new(
            &s,
            &[
                io("mask", DType::I64, &[-1, -1]),
                io("ids", DType::I64, &[-1, -1]),
            ],
            &[
                io("hidden", DType::F32, &[-1, -1, 2]),
                io("pooled", DType::F32, &[-1, 2]),
            ],
        )
        .unwrap()
    }

    #[test]
    fn merges_with_padding_and_splits_back() {
        let plan = bert_plan();
        // Job a: 1 row of length 3; job b: 2 rows of length 2. Inputs sorted by name.
        let a = vec![
            ("ids".to_owned(), i64s(&[1, 3], &[1, 2, 3])),
            ("mask".to_owned(), i64s(&[1, 3], &[1, 1, 1])),
        ];
        let b = vec![
            ("ids".to_owned(), i64s(&[2, 2], &[4, 5, 6, 7])),
            ("mask".to_owned(), i64s(&[2, 2], &[1, 1, 1, 1])),
        ];
        let (ka, kb) = (plan.key(&a).unwrap(), plan.key(&b).unwrap());
        assert!(ka.merges_with(&kb));
        let merged = plan.merge(&[(&ka, &a), (&kb, &b)]);
        assert_eq!(merged.total_rows, 3);
        assert_eq!(merged.inputs[0].1.dims, vec![3, 3]);
        assert_eq!(
            i64_values(&merged.inputs[0].1),
            vec![1, 2, 3, 4, 5, 0, 6, 7, 0]
        );
        assert_eq!(
            i64_values(&merged.inputs[1].1),
            vec![1, 1, 1, 1, 1, 0, 1, 1, 0]
        );

        // hidden [3, 3, 2] = row*100 + pos*10 + k; pooled [3, 2].
        let hidden: Vec<f32> = (0..3)
            .flat_map(|r| {
                (0..3).flat_map(move |p| (0..2).map(move |k| (r * 100 + p * 10 + k) as f32))
            })
            .collect();
        let pooled: Vec<f32> = (0..6).map(|v| v as f32).collect();
        let outputs = vec![
            (
                "hidden".to_owned(),
                Tensor::new(
                    vec![3, 3, 2],
                    DType::F32,
                    bytemuck::cast_slice(&hidden).to_vec(),
                ),
            ),
            (
                "pooled".to_owned(),
                Tensor::new(
                    vec![3, 2],
                    DType::F32,
                    bytemuck::cast_slice(&pooled).to_vec(),
                ),
            ),
        ];
        let split = plan.split(&merged, &[&ka, &kb], outputs).unwrap();
        assert_eq!(split[0][0].1.dims, vec![1, 3, 2]);
        assert_eq!(f32s(&split[0][0].1), vec![0., 1., 10., 11., 20., 21.]);
        assert_eq!(split[1][0].1.dims, vec![2, 2, 2]);
        assert_eq!(
            f32s(&split[1][0].1),
            vec![100., 101., 110., 111., 200., 201., 210., 211.]
        );
        assert_eq!(split[0][1].1.dims, vec![1, 2]);
        assert_eq!(f32s(&split[1][1].1), vec![2., 3., 4., 5.]);
    }

    #[test]
    fn only_compatible_jobs_share_a_key() {
        let plan = bert_plan();
        let job =
            |ids: Tensor, mask: Tensor| vec![("ids".to_owned(), ids), ("mask".to_owned(), mask)];
        let a = plan
            .key(&job(i64s(&[1, 2], &[1, 2]), i64s(&[1, 2], &[1, 1])))
            .unwrap();
        // Different lengths and rows merge; a different rank does not.
        let b = plan
            .key(&job(i64s(&[2, 4], &[0; 8]), i64s(&[2, 4], &[0; 8])))
            .unwrap();
        assert!(a.merges_with(&b));
        // Rows disagree between inputs, or padded lengths disagree while an output follows the
        // common length: runs alone.
        assert!(plan
            .key(&job(i64s(&[1, 2], &[1, 2]), i64s(&[2, 1], &[1, 1])))
            .is_none());
        assert!(plan
            .key(&job(i64s(&[1, 2], &[1, 2]), i64s(&[1, 1], &[1])))
            .is_none());
        // A different element type does not merge.
        let f = Tensor::new(vec![1, 2], DType::I32, vec![0u8; 8]);
        let c = plan.key(&job(i64s(&[1, 2], &[1, 2]), f)).unwrap();
        assert!(!a.merges_with(&c));
    }

    #[test]
    fn padding_and_rows_bound_a_batch() {
        let plan = bert_plan(); // max_size 8, max_padding 0.1
        let job = |rows: u32, len: u32| {
            let n = (rows * len) as usize;
            let inputs = vec![
                ("ids".to_owned(), i64s(&[rows, len], &vec![1; n])),
                ("mask".to_owned(), i64s(&[rows, len], &vec![1; n])),
            ];
            plan.key(&inputs).unwrap()
        };
        let first = job(1, 10);
        let fill = plan.start(&first);
        // 1x10 + 1x11: 22 padded cells per input, 21 real: 5% padding.
        let fill = plan.add(&fill, &first, &job(1, 11), 8).unwrap();
        assert_eq!(fill.rows, 2);
        // + 1x13: 39 padded, 34 real: 13% padding, over the bound.
        assert!(plan.add(&fill, &first, &job(1, 13), 8).is_none());
        // + 1x11 fits; 7 more rows do not fit in 8.
        assert!(plan.add(&fill, &first, &job(1, 11), 8).is_some());
        assert!(plan.add(&fill, &first, &job(7, 11), 8).is_none());
        assert_eq!(job(1, 12).distance(&first), 4, "per padded input");
    }

    #[test]
    fn a_wrong_output_shape_is_refused_not_split() {
        let plan = bert_plan();
        let a = vec![
            ("ids".to_owned(), i64s(&[1, 3], &[1, 2, 3])),
            ("mask".to_owned(), i64s(&[1, 3], &[1, 1, 1])),
        ];
        let k = plan.key(&a).unwrap();
        let merged = plan.merge(&[(&k, &a), (&k, &a)]);
        let out = vec![(
            "hidden".to_owned(),
            Tensor::new(vec![2, 4, 2], DType::F32, vec![0u8; 64]),
        )];
        let err = plan.split(&merged, &[&k, &k], out).unwrap_err();
        assert!(err.contains("padded length 3"), "{err}");
    }

    #[test]
    fn declarations_are_checked() {
        let err = |text: &str, inputs: &[IoSpec], outputs: &[IoSpec]| {
            let mut s = spec(text);
            s.origin = "m/model.toml: field `graphs.model.batch".into();
            BatchPlan::new(&s, inputs, outputs).unwrap_err().to_string()
        };
        let ins = [io("ids", DType::I64, &[-1, -1])];
        let outs = [io("h", DType::F32, &[-1, -1, 4])];
        let e = err("pad = { idz = { axis = 1 } }", &ins, &outs);
        assert!(
            e.contains("`graphs.model.batch.pad.idz`") && e.contains("inputs are: ids"),
            "{e}"
        );
        let e = err("pad = { ids = { axis = 1, value = 1.5 } }", &ins, &outs);
        assert!(e.contains("pad.ids.value") && e.contains("integer"), "{e}");
        let e = err(
            "pad = { ids = { axis = 1 } }\noutputs = { h = 2 }",
            &ins,
            &outs,
        );
        assert!(e.contains("outputs.h") && e.contains("axis 2"), "{e}");
        let e = err("max_size = 0", &ins, &outs);
        assert!(e.contains("max_size"), "{e}");
        let e = err("", &[io("x", DType::F32, &[1, 4])], &outs);
        assert!(e.contains("batch.axis") && e.contains("[1, 4]"), "{e}");
        let e = err("outputs = { h = 1 }", &ins, &outs);
        assert!(e.contains("outputs.h") && e.contains("pad"), "{e}");
        let e = err(
            "pad = { ids = { axis = 1 } }\noutputs = { h = { axis = 1, input = \"x\" } }",
            &ins,
            &outs,
        );
        assert!(e.contains("outputs.h.input"), "{e}");
        assert!(toml::from_str::<BatchSpec>("max_wait = 3").is_err());
    }

    #[test]
    fn pad_values_fit_their_type() {
        assert_eq!(pad_bytes(PadValue::Int(7), DType::U8).unwrap(), vec![7]);
        assert!(pad_bytes(PadValue::Int(256), DType::U8).is_err());
        assert_eq!(
            pad_bytes(PadValue::Int(-1), DType::F32).unwrap(),
            (-1.0f32).to_le_bytes().to_vec()
        );
        assert_eq!(
            pad_bytes(PadValue::Float(0.5), DType::F16).unwrap(),
            half::f16::from_f32(0.5).to_le_bytes().to_vec()
        );
    }

    #[test]
    fn copy_region_moves_blocks() {
        // src [2, 3] into dst [3, 4] at (1, 0).
        let src: Vec<u8> = (1..=6).collect();
        let mut dst = vec![0u8; 12];
        copy_region(
            &src,
            &[2, 3],
            &[0, 0],
            &mut dst,
            &[3, 4],
            &[1, 0],
            &[2, 3],
            1,
        );
        assert_eq!(dst, vec![0, 0, 0, 0, 1, 2, 3, 0, 4, 5, 6, 0]);
        // and back out
        let mut back = vec![0u8; 6];
        copy_region(
            &dst,
            &[3, 4],
            &[1, 0],
            &mut back,
            &[2, 3],
            &[0, 0],
            &[2, 3],
            1,
        );
        assert_eq!(back, src);
        // rank 3, padded middle axis, 2-byte elements
        let src: Vec<u8> = (0..8).collect(); // [1, 2, 2] of u16
        let mut dst = vec![9u8; 12]; // [1, 3, 2] of u16
        copy_region(
            &src,
            &[1, 2, 2],
            &[0, 0, 0],
            &mut dst,
            &[1, 3, 2],
            &[0, 0, 0],
            &[1, 2, 2],
            2,
        );
        assert_eq!(dst, vec![0, 1, 2, 3, 4, 5, 6, 7, 9, 9, 9, 9]);
    }
}
