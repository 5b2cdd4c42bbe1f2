//! A guest's tensor, as the `wasi:nn` host checks it: dimensions, element type and bytes come
//! from the plugin (`tensor` constructor), and nothing about them is trusted. The host
//! (`kiln-host`'s `nn`) keeps the tensor itself and calls these checks.

/// Number of elements the dimensions describe; None if the product, taken left to right,
/// overflows. A zero dimension after such an overflow does not make the dimensions acceptable:
/// they are refused as too large (ONNX Runtime's own shape arithmetic would overflow on them).
pub fn element_count(dims: &[u32]) -> Option<usize> {
    dims.iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d as usize))
}

/// Checks that `len` bytes are exactly what `dims` elements of `element_size` bytes (of the
/// type named `type_name`) need.
pub fn check_len(
    dims: &[u32],
    element_size: usize,
    type_name: &str,
    len: usize,
) -> Result<(), String> {
    let expected = element_count(dims)
        .and_then(|n| n.checked_mul(element_size))
        .ok_or_else(|| format!("tensor dimensions {dims:?} are too large"))?;
    if expected != len {
        return Err(format!(
            "tensor data is {len} bytes but dimensions {dims:?} of {type_name} need {expected} bytes"
        ));
    }
    Ok(())
}

/// Whether `dims` fit a graph input's declared shape (a negative dimension is dynamic).
pub fn shape_fits(dims: &[u32], declared: &[i64]) -> bool {
    dims.len() == declared.len()
        && dims
            .iter()
            .zip(declared)
            .all(|(&d, &s)| s < 0 || i64::from(d) == s)
}

/// Limits on what one instance may keep on the host (wasmtime's `StoreLimits` sees only guest
/// memory; these tensors live outside it).
#[derive(Debug, Clone, Copy)]
pub struct TensorBudgetLimits {
    /// Bytes of tensor data alive at once: a model's largest step (inputs + outputs + KV cache)
    /// with room to spare; past it a plugin is leaking or flooding.
    pub max_bytes: u64,
    /// Tensor, graph, context and error resources alive at once: each costs a table slot and
    /// some host memory even when empty.
    pub max_live: u32,
}

/// One instance's live resources and their bytes, against its [`TensorBudgetLimits`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InstanceTensors {
    pub bytes: u64,
    pub live: u32,
}

impl InstanceTensors {
    /// The bytes alive once a new resource of `bytes` is added, if the limits allow it.
    pub fn admit(&self, limits: &TensorBudgetLimits, bytes: u64) -> Result<u64, String> {
        if self.live >= limits.max_live {
            return Err(format!(
                "tensor budget exceeded: more than {} live wasi:nn resources in one instance",
                limits.max_live
            ));
        }
        let total = self.bytes.saturating_add(bytes);
        if total > limits.max_bytes {
            return Err(format!(
                "tensor budget exceeded: {} bytes of host tensors would be alive, the limit is {}",
                total, limits.max_bytes
            ));
        }
        Ok(total)
    }

    /// Counts the resource [`Self::admit`] allowed, `total` being what it returned.
    pub fn add(&mut self, total: u64) {
        self.live += 1;
        self.bytes = total;
    }

    /// Removes a resource that held `bytes`; returns the bytes released (never more than are
    /// counted).
    pub fn release(&mut self, bytes: u64) -> u64 {
        let bytes = bytes.min(self.bytes);
        self.live = self.live.saturating_sub(1);
        self.bytes -= bytes;
        bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_len_rejects_mismatch_and_overflow() {
        assert!(check_len(&[2, 3], 4, "FP32", 24).is_ok());
        let err = check_len(&[2, 3], 4, "FP32", 23).unwrap_err();
        assert!(err.contains("23 bytes") && err.contains("need 24"), "{err}");
        let err = check_len(&[u32::MAX, u32::MAX, u32::MAX], 8, "I64", 0).unwrap_err();
        assert!(err.contains("too large"), "{err}");
        assert!(
            check_len(&[1, 0, 4], 2, "FP16", 0).is_ok(),
            "zero-length dimensions are valid"
        );
        assert!(
            check_len(&[], 4, "FP32", 4).is_ok(),
            "a scalar is one element"
        );
        // The running product must fit: a zero after an overflow does not rescue the dims
        // (the `nn_tensor` fuzz target holds this definition).
        assert_eq!(element_count(&[u32::MAX, u32::MAX, 0]), Some(0));
        assert_eq!(element_count(&[u32::MAX, u32::MAX, u32::MAX, 0]), None);
        assert!(check_len(&[u32::MAX, u32::MAX, u32::MAX, 0], 1, "U8", 0).is_err());
    }

    #[test]
    fn shapes_with_dynamic_dimensions() {
        assert!(shape_fits(&[1, 7], &[-1, 7]));
        assert!(!shape_fits(&[1, 7], &[-1, 8]));
        assert!(!shape_fits(&[1], &[-1, -1]));
        assert!(!shape_fits(&[u32::MAX], &[-1, 4][1..]));
    }

    #[test]
    fn budget_counts_and_refuses() {
        let limits = TensorBudgetLimits {
            max_bytes: 10,
            max_live: 2,
        };
        let mut t = InstanceTensors::default();
        t.add(t.admit(&limits, 6).unwrap());
        assert!(t.admit(&limits, 5).unwrap_err().contains("11 bytes"));
        t.add(t.admit(&limits, 4).unwrap());
        assert!(t.admit(&limits, 0).unwrap_err().contains("more than 2"));
        assert_eq!(t.release(100), 10, "never more than is counted");
        assert_eq!(t, InstanceTensors { bytes: 0, live: 1 });
    }
}
