//! Host-resident tensors: what a `wasi:nn` `tensor` resource is on the host side.
//!
//! A tensor's bytes live in an `Arc` so that `tensor-ext.clone` shares them without a copy and a
//! KV-cache output can be handed back as the next step's input without ever entering the guest.
//! Nothing here trusts the guest: dimensions and byte length are checked only when the tensor is
//! used ([`Tensor::check_len`], `kiln_wire::tensor`, fuzzed on its own), and every failure is a
//! message for the plugin author.

use std::sync::Arc;

use ort::value::{DynValue, TensorElementType, ValueType};

use super::bindings::wasi::nn::tensor::TensorType;

/// The element types Kiln's backend moves between guests and ONNX Runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F16,
    F32,
    F64,
    Bf16,
    U8,
    I32,
    I64,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::U8 => 1,
            DType::F16 | DType::Bf16 => 2,
            DType::F32 | DType::I32 => 4,
            DType::F64 | DType::I64 => 8,
        }
    }

    pub fn from_wit(ty: TensorType) -> Self {
        match ty {
            TensorType::Fp16 => DType::F16,
            TensorType::Fp32 => DType::F32,
            TensorType::Fp64 => DType::F64,
            TensorType::Bf16 => DType::Bf16,
            TensorType::U8 => DType::U8,
            TensorType::I32 => DType::I32,
            TensorType::I64 => DType::I64,
        }
    }

    pub fn to_wit(self) -> TensorType {
        match self {
            DType::F16 => TensorType::Fp16,
            DType::F32 => TensorType::Fp32,
            DType::F64 => TensorType::Fp64,
            DType::Bf16 => TensorType::Bf16,
            DType::U8 => TensorType::U8,
            DType::I32 => TensorType::I32,
            DType::I64 => TensorType::I64,
        }
    }

    /// None for ONNX element types wasi:nn cannot express (strings, bool, int8, ...).
    pub fn from_ort(ty: TensorElementType) -> Option<Self> {
        Some(match ty {
            TensorElementType::Float16 => DType::F16,
            TensorElementType::Float32 => DType::F32,
            TensorElementType::Float64 => DType::F64,
            TensorElementType::Bfloat16 => DType::Bf16,
            TensorElementType::Uint8 => DType::U8,
            TensorElementType::Int32 => DType::I32,
            TensorElementType::Int64 => DType::I64,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F16 => "FP16",
            DType::F32 => "FP32",
            DType::F64 => "FP64",
            DType::Bf16 => "BF16",
            DType::U8 => "U8",
            DType::I32 => "I32",
            DType::I64 => "I64",
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A tensor owned by the host. Elements are little-endian, row-major.
#[derive(Debug, Clone)]
pub struct Tensor {
    pub dims: Vec<u32>,
    pub dtype: DType,
    pub data: Arc<[u8]>,
}

impl Tensor {
    pub fn new(dims: Vec<u32>, dtype: DType, data: impl Into<Arc<[u8]>>) -> Self {
        Self {
            dims,
            dtype,
            data: data.into(),
        }
    }

    /// Number of elements the dimensions describe; None if it overflows.
    pub fn element_count(dims: &[u32]) -> Option<usize> {
        kiln_wire::tensor::element_count(dims)
    }

    /// Checks that the byte length matches the dimensions and element type.
    pub fn check_len(&self) -> Result<(), String> {
        kiln_wire::tensor::check_len(
            &self.dims,
            self.dtype.size(),
            self.dtype.name(),
            self.data.len(),
        )
    }

    /// Copies the data into an ONNX Runtime value. The caller has run [`Self::check_len`].
    pub fn to_ort(&self) -> Result<DynValue, String> {
        let shape: Vec<i64> = self.dims.iter().map(|&d| i64::from(d)).collect();
        macro_rules! value {
            ($t:ty) => {{
                // `pod_collect_to_vec` copies into a properly aligned Vec<T>: the Arc'd bytes
                // have no alignment guarantee.
                let data: Vec<$t> = bytemuck::allocation::pod_collect_to_vec(&self.data);
                ort::value::Tensor::from_array((shape, data)).map(|t| t.into_dyn())
            }};
        }
        let value = match self.dtype {
            DType::F16 => value!(half::f16),
            DType::F32 => value!(f32),
            DType::F64 => value!(f64),
            DType::Bf16 => value!(half::bf16),
            DType::U8 => value!(u8),
            DType::I32 => value!(i32),
            DType::I64 => value!(i64),
        };
        value.map_err(|e| format!("could not create an ONNX Runtime tensor: {e}"))
    }

    /// Copies an ONNX Runtime output into a host tensor.
    pub fn from_ort(name: &str, value: &DynValue) -> Result<Self, String> {
        let ValueType::Tensor { ty, shape, .. } = value.dtype() else {
            return Err(format!(
                "output '{name}' is not a tensor ({}); wasi:nn carries tensors only",
                value.dtype()
            ));
        };
        let dtype = DType::from_ort(*ty).ok_or_else(|| {
            format!("output '{name}' has element type {ty:?}, which wasi:nn cannot represent")
        })?;
        let dims = shape
            .iter()
            .map(|&d| u32::try_from(d))
            .collect::<Result<Vec<u32>, _>>()
            .map_err(|_| format!("output '{name}' has a dimension outside u32: {shape:?}"))?;
        if Self::element_count(&dims) == Some(0) {
            // ONNX Runtime may hand out no data pointer at all for an empty tensor.
            return Ok(Self::new(dims, dtype, Vec::new()));
        }
        macro_rules! bytes {
            ($t:ty) => {
                value
                    .try_extract_tensor::<$t>()
                    .map(|(_, data)| Arc::<[u8]>::from(bytemuck::cast_slice::<$t, u8>(data)))
            };
        }
        let data = match dtype {
            DType::F16 => bytes!(half::f16),
            DType::F32 => bytes!(f32),
            DType::F64 => bytes!(f64),
            DType::Bf16 => bytes!(half::bf16),
            DType::U8 => bytes!(u8),
            DType::I32 => bytes!(i32),
            DType::I64 => bytes!(i64),
        }
        .map_err(|e| format!("could not read output '{name}': {e}"))?;
        Ok(Self { dims, dtype, data })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_len_rejects_mismatch_and_overflow() {
        let t = Tensor::new(vec![2, 3], DType::F32, vec![0u8; 24]);
        assert!(t.check_len().is_ok());
        let t = Tensor::new(vec![2, 3], DType::F32, vec![0u8; 23]);
        let err = t.check_len().unwrap_err();
        assert!(err.contains("23 bytes") && err.contains("need 24"), "{err}");
        let t = Tensor::new(vec![u32::MAX, u32::MAX, u32::MAX], DType::I64, vec![]);
        assert!(t.check_len().unwrap_err().contains("too large"));
        let t = Tensor::new(vec![1, 0, 4], DType::F16, vec![]);
        assert!(t.check_len().is_ok(), "zero-length dimensions are valid");
    }

    #[test]
    fn wit_dtype_round_trip() {
        for ty in [
            TensorType::Fp16,
            TensorType::Fp32,
            TensorType::Fp64,
            TensorType::Bf16,
            TensorType::U8,
            TensorType::I32,
            TensorType::I64,
        ] {
            assert_eq!(DType::from_wit(ty).to_wit(), ty);
        }
    }
}
