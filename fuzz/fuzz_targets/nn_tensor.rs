//! A plugin's `wasi:nn` tensors, as the host checks them: a sequence of tensor creations (any
//! dimensions, element type, byte length), clones and drops against an instance's budget.
//!
//! Properties: the element count is the dimensions' product whenever every running product
//! fits a usize (computed here in u128), None otherwise; a tensor's length is accepted exactly
//! when it equals that count times the element size; the shape check matches its definition; the budget never counts
//! more bytes or resources than its limits, always counts exactly what is alive, and gives
//! everything back when all is dropped.
#![no_main]

use arbitrary::Arbitrary;
use kiln_wire::tensor::{self, InstanceTensors, TensorBudgetLimits};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
enum Op {
    /// `tensor(dimensions, type, data)`: the data's length only (the bytes do not matter).
    Create {
        dims: Vec<u32>,
        dtype: u8,
        len: u16,
        /// Pretend the data is this much larger (a guest's large tensor without the memory).
        len_scale: u8,
    },
    /// `tensor-ext.clone`: shares the data, charges a resource but no bytes.
    Clone,
    /// Drops a live tensor.
    Drop(u8),
    /// An error or a graph resource: no bytes.
    Other,
    /// Checks dims against a declared graph input shape.
    Shape { dims: Vec<u32>, declared: Vec<i64> },
}

#[derive(Debug, Arbitrary)]
struct Input {
    max_bytes: u32,
    max_live: u8,
    ops: Vec<Op>,
}

const SIZES: [(usize, &str); 7] = [
    (2, "FP16"),
    (4, "FP32"),
    (8, "FP64"),
    (2, "BF16"),
    (1, "U8"),
    (4, "I32"),
    (8, "I64"),
];

fuzz_target!(|input: Input| {
    let limits = TensorBudgetLimits {
        max_bytes: u64::from(input.max_bytes),
        max_live: u32::from(input.max_live),
    };
    let mut budget = InstanceTensors::default();
    // The bytes each live resource was charged (a clone shares its data: none).
    let mut live: Vec<u64> = Vec::new();
    for op in input.ops {
        match op {
            Op::Create {
                dims,
                dtype,
                len,
                len_scale,
            } => {
                let (size, name) = SIZES[usize::from(dtype) % SIZES.len()];
                let len = usize::from(len) << (len_scale % 40);
                // The element count by definition: every running product fits a usize (a zero
                // dimension after an overflow does not make the dimensions acceptable).
                let product = dims.iter().try_fold(1u128, |n, &d| {
                    let n = n * u128::from(d);
                    (n <= usize::MAX as u128).then_some(n)
                });
                assert_eq!(
                    tensor::element_count(&dims).map(|n| n as u128),
                    product,
                    "{dims:?}"
                );
                let expected = product
                    .map(|n| n * size as u128)
                    .filter(|&b| b <= usize::MAX as u128);
                let accepted = tensor::check_len(&dims, size, name, len).is_ok();
                assert_eq!(
                    accepted,
                    expected == Some(len as u128),
                    "{dims:?} {size} {len}"
                );
                let bytes = len as u64;
                match budget.admit(&limits, bytes) {
                    Ok(total) => {
                        assert_eq!(total, budget.bytes + bytes);
                        budget.add(total);
                        live.push(bytes);
                    }
                    Err(_) => assert!(
                        budget.live >= limits.max_live
                            || budget.bytes.saturating_add(bytes) > limits.max_bytes
                    ),
                }
            }
            Op::Clone if !live.is_empty() => {
                if let Ok(total) = budget.admit(&limits, 0) {
                    assert_eq!(total, budget.bytes);
                    budget.add(total);
                    live.push(0);
                }
            }
            Op::Drop(i) if !live.is_empty() => {
                let gone = live.swap_remove(usize::from(i) % live.len());
                assert_eq!(budget.release(gone), gone);
            }
            Op::Other => {
                if let Ok(total) = budget.admit(&limits, 0) {
                    budget.add(total);
                    live.push(0);
                }
            }
            Op::Shape { dims, declared } => {
                let fits = tensor::shape_fits(&dims, &declared);
                let expected = dims.len() == declared.len()
                    && dims
                        .iter()
                        .zip(&declared)
                        .all(|(&d, &s)| s < 0 || s == i64::from(d));
                assert_eq!(fits, expected);
            }
            Op::Clone | Op::Drop(_) => {}
        }
        assert!(budget.bytes <= limits.max_bytes);
        assert!(budget.live <= limits.max_live);
        assert_eq!(budget.live as usize, live.len());
        assert_eq!(budget.bytes, live.iter().sum::<u64>());
    }
    for gone in live {
        budget.release(gone);
    }
    assert_eq!(budget, InstanceTensors::default());
});
