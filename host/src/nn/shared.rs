//! Weights shared by the sessions of one graph.
//!
//! ORT's graph optimizer folds constants when a session is created: in an int8-quantized model
//! every `DequantizeLinear` of a weight becomes an fp32 initializer, and the MatMul kernels then
//! prepack those weights into their own layout. Done per session, all-MiniLM-L6-v2 int8 (22 MiB
//! on disk) costs ~86 MiB of folded weights and ~42 MiB of prepacked ones *per session*, and a
//! graph has several sessions (two plus the lead by default). Turning folding off instead makes
//! runs ~3x slower.
//!
//! So a graph with more than one session is optimized once: a throwaway session at the full
//! optimization level writes the optimized model to a private temporary folder, every
//! initializer of [`EXTERNAL_MIN_BYTES`] or more to an external data file beside it. Those
//! initializers are read once into ORT values, and every session of the graph loads the
//! optimized model with optimization off, given the values as shared initializers
//! (`AddInitializer`, which ORT uses in place, without a copy) and one prepacked-weights
//! container (ORT shares prepacked buffers between sessions only for such shared initializers).
//!
//! Measured on MiniLM int8 with three sessions: 86 MiB shared plus 51, 11 and 11 MiB for the
//! sessions, against ~137 MiB for each session alone; same speed, identical outputs
//! (docs/benchmarks.md, "Memory"). If any step fails the graph's sessions load the model
//! file each on their own, as before, and the reason is logged.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context};
use ort::session::builder::{GraphOptimizationLevel, PrepackedWeights, SessionBuilder};
use ort::value::{DynValue, TensorElementType};

/// Initializers this large or larger are shared. Smaller ones (biases, scales, shape constants)
/// stay inside the optimized model and each session keeps its own copy: they add up to a few
/// KiB, and ORT's optimizer reads them as constants.
pub const EXTERNAL_MIN_BYTES: usize = 4096;

/// The file names inside the temporary folder.
const MODEL_FILE: &str = "optimized.onnx";
const DATA_FILE: &str = "optimized.weights";

/// The optimized model of one graph and its large weights, ready to give to each session.
pub struct SharedWeights {
    folder: TempFolder,
    values: Vec<(String, Arc<DynValue>)>,
    prepacked: PrepackedWeights,
}

impl SharedWeights {
    /// Optimizes `source` once with `builder` (its execution provider and options; the
    /// optimization level is set here) and reads the large weights of the result.
    pub fn prepare(builder: SessionBuilder, source: &Path) -> anyhow::Result<Self> {
        let folder = TempFolder::new()?;
        let model = folder.path.join(MODEL_FILE);
        let optimize = || -> ort::Result<ort::session::Session> {
            builder
                .with_optimization_level(GraphOptimizationLevel::Level3)?
                .with_optimized_model_path(&model)?
                .with_config_entry(
                    "session.optimized_model_external_initializers_file_name",
                    DATA_FILE,
                )?
                .with_config_entry(
                    "session.optimized_model_external_initializers_min_size_in_bytes",
                    EXTERNAL_MIN_BYTES.to_string(),
                )?
                .commit_from_file(source)
        };
        let session = optimize().context("optimizing the model")?;
        drop(session);
        let bytes = std::fs::read(&model).context("reading the optimized model")?;
        let data = folder.path.join(DATA_FILE);
        let values = read_external_initializers(&bytes, &data)?;
        Ok(Self {
            folder,
            values,
            prepacked: PrepackedWeights::new(),
        })
    }

    /// The optimized model file, to give to [`SessionBuilder::commit_from_file`] after
    /// [`Self::apply`].
    pub fn model(&self) -> PathBuf {
        self.folder.path.join(MODEL_FILE)
    }

    /// Sets a session up to use the shared weights: no further optimization (the model is
    /// already optimized), the shared initializers, the shared prepacked weights.
    pub fn apply(&self, builder: SessionBuilder) -> ort::Result<SessionBuilder> {
        let mut builder = builder
            .with_optimization_level(GraphOptimizationLevel::Disable)?
            .with_prepacked_weights(&self.prepacked)?;
        for (name, value) in &self.values {
            builder = builder.with_initializer(name, Arc::clone(value))?;
        }
        Ok(builder)
    }

    /// Number and total bytes of the shared initializers.
    pub fn size(&self) -> (usize, u64) {
        let bytes = self.values.iter().map(|(_, v)| value_bytes(v)).sum();
        (self.values.len(), bytes)
    }
}

fn value_bytes(value: &DynValue) -> u64 {
    match value.dtype() {
        ort::value::ValueType::Tensor { ty, shape, .. } => {
            element_size(*ty).unwrap_or(0) as u64 * shape.num_elements() as u64
        }
        _ => 0,
    }
}

/// A folder under the system's temporary directory, removed (with its files) when dropped.
/// Sessions do not need the files once created: ORT reads the model and any weight not
/// shared while it creates a session.
struct TempFolder {
    path: PathBuf,
}

impl TempFolder {
    fn new() -> anyhow::Result<Self> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "kiln-optimized-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self { path })
    }
}

impl Drop for TempFolder {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Bytes per element, for the element types a shared initializer may have.
fn element_size(ty: TensorElementType) -> Option<usize> {
    use TensorElementType as T;
    Some(match ty {
        T::Float32 | T::Int32 | T::Uint32 => 4,
        T::Float64 | T::Int64 | T::Uint64 => 8,
        T::Float16 | T::Bfloat16 | T::Int16 | T::Uint16 => 2,
        T::Int8 | T::Uint8 | T::Bool => 1,
        _ => return None,
    })
}

/// ONNX `TensorProto.DataType` numbers of the element types a shared initializer may have.
fn element_type(onnx: u64) -> Option<TensorElementType> {
    use TensorElementType as T;
    Some(match onnx {
        1 => T::Float32,
        2 => T::Uint8,
        3 => T::Int8,
        4 => T::Uint16,
        5 => T::Int16,
        6 => T::Int32,
        7 => T::Int64,
        10 => T::Float16,
        11 => T::Float64,
        12 => T::Uint32,
        13 => T::Uint64,
        16 => T::Bfloat16,
        _ => return None,
    })
}

/// Reads every top-level initializer of the model (serialized `ModelProto` bytes) stored in
/// `data`, the external data file ORT wrote beside it. Initializers of other element types
/// (strings, booleans, complex numbers, 4-bit and 8-bit floats) are left to ORT, which reads
/// them per session.
fn read_external_initializers(
    model: &[u8],
    data: &Path,
) -> anyhow::Result<Vec<(String, Arc<DynValue>)>> {
    let file = File::open(data).with_context(|| format!("opening {}", data.display()))?;
    use TensorElementType as T;
    let mut values = Vec::new();
    for init in proto::external_initializers(model)? {
        let Some(ty) = element_type(init.data_type) else {
            continue;
        };
        let size = element_size(ty).expect("element_type returns sized types");
        if init.location != DATA_FILE {
            bail!(
                "initializer '{}' is stored in '{}', not in {DATA_FILE}",
                init.name,
                init.location
            );
        }
        let count = init
            .dims
            .iter()
            .try_fold(1usize, |n, &d| {
                usize::try_from(d).ok().and_then(|d| n.checked_mul(d))
            })
            .with_context(|| format!("initializer '{}' has shape {:?}", init.name, init.dims))?;
        let bytes = count
            .checked_mul(size)
            .with_context(|| format!("initializer '{}' is too large", init.name))?;
        if init.length.is_some_and(|l| l != bytes as u64) {
            bail!(
                "initializer '{}': {} bytes stored for {bytes} expected",
                init.name,
                init.length.unwrap_or(0)
            );
        }
        // ORT takes a shared initializer only in memory it does not own, so the bytes go into
        // a Vec of the element type (aligned for it) that the value keeps.
        let read = |buffer: &mut [u8]| {
            file.read_exact_at(buffer, init.offset)
                .with_context(|| format!("reading initializer '{}'", init.name))
        };
        let shape = init.dims.clone();
        let value = match ty {
            T::Float32 => owned::<f32>(shape, count, read)?,
            T::Float64 => owned::<f64>(shape, count, read)?,
            T::Float16 => owned::<half::f16>(shape, count, read)?,
            T::Bfloat16 => owned::<half::bf16>(shape, count, read)?,
            T::Int8 => owned::<i8>(shape, count, read)?,
            T::Uint8 => owned::<u8>(shape, count, read)?,
            T::Int16 => owned::<i16>(shape, count, read)?,
            T::Uint16 => owned::<u16>(shape, count, read)?,
            T::Int32 => owned::<i32>(shape, count, read)?,
            T::Uint32 => owned::<u32>(shape, count, read)?,
            T::Int64 => owned::<i64>(shape, count, read)?,
            T::Uint64 => owned::<u64>(shape, count, read)?,
            _ => continue,
        };
        values.push((init.name, Arc::new(value)));
    }
    Ok(values)
}

/// A tensor of `count` elements of `E`, its bytes filled by `read`, in a Vec that the value owns.
fn owned<E>(
    shape: Vec<i64>,
    count: usize,
    read: impl FnOnce(&mut [u8]) -> anyhow::Result<()>,
) -> anyhow::Result<DynValue>
where
    E: ort::value::PrimitiveTensorElementType + Copy + Default + std::fmt::Debug + 'static,
{
    let mut data = vec![E::default(); count];
    // SAFETY: every element type used here is a plain number (or half-float) for which any bit
    // pattern is a valid value, and the slice covers exactly the Vec's initialized elements.
    let bytes = unsafe {
        std::slice::from_raw_parts_mut(
            data.as_mut_ptr().cast::<u8>(),
            std::mem::size_of_val(&data[..]),
        )
    };
    read(bytes)?;
    Ok(ort::value::Tensor::from_array((shape, data))?.into_dyn())
}

/// Just enough of the protobuf wire format to find a model's external initializers.
mod proto {
    use anyhow::{bail, Context};

    /// ONNX field numbers (onnx.proto3).
    const MODEL_GRAPH: u32 = 7;
    const GRAPH_INITIALIZER: u32 = 5;
    const TENSOR_DIMS: u32 = 1;
    const TENSOR_DATA_TYPE: u32 = 2;
    const TENSOR_NAME: u32 = 8;
    const TENSOR_EXTERNAL_DATA: u32 = 13;
    const TENSOR_DATA_LOCATION: u32 = 14;
    const ENTRY_KEY: u32 = 1;
    const ENTRY_VALUE: u32 = 2;
    /// `TensorProto.DataLocation.EXTERNAL`.
    const EXTERNAL: u64 = 1;

    /// One initializer whose bytes live in an external file.
    #[derive(Debug, Default, PartialEq)]
    pub struct External {
        pub name: String,
        pub data_type: u64,
        pub dims: Vec<i64>,
        pub location: String,
        pub offset: u64,
        pub length: Option<u64>,
    }

    enum Value<'a> {
        Varint(u64),
        Bytes(&'a [u8]),
        /// A fixed-width field, skipped.
        Fixed,
    }

    struct Reader<'a> {
        buf: &'a [u8],
    }

    impl<'a> Reader<'a> {
        fn varint(&mut self) -> anyhow::Result<u64> {
            let mut value = 0u64;
            for shift in (0..64).step_by(7) {
                let (&byte, rest) = self.buf.split_first().context("truncated varint")?;
                self.buf = rest;
                value |= u64::from(byte & 0x7f) << shift;
                if byte & 0x80 == 0 {
                    return Ok(value);
                }
            }
            bail!("varint longer than 10 bytes")
        }

        fn take(&mut self, n: u64) -> anyhow::Result<&'a [u8]> {
            let n = usize::try_from(n).ok().filter(|&n| n <= self.buf.len());
            let n = n.context("field runs past the end of its message")?;
            let (head, rest) = self.buf.split_at(n);
            self.buf = rest;
            Ok(head)
        }

        fn field(&mut self) -> anyhow::Result<Option<(u32, Value<'a>)>> {
            if self.buf.is_empty() {
                return Ok(None);
            }
            let key = self.varint()?;
            let number = u32::try_from(key >> 3).context("field number out of range")?;
            let value = match key & 7 {
                0 => Value::Varint(self.varint()?),
                1 => {
                    self.take(8)?;
                    Value::Fixed
                }
                2 => {
                    let n = self.varint()?;
                    Value::Bytes(self.take(n)?)
                }
                5 => {
                    self.take(4)?;
                    Value::Fixed
                }
                w => bail!("unsupported protobuf wire type {w}"),
            };
            Ok(Some((number, value)))
        }
    }

    fn fields(buf: &[u8]) -> impl Iterator<Item = anyhow::Result<(u32, Value<'_>)>> {
        let mut reader = Reader { buf };
        std::iter::from_fn(move || reader.field().transpose())
    }

    fn text(bytes: &[u8]) -> anyhow::Result<String> {
        String::from_utf8(bytes.to_vec()).context("a name is not UTF-8")
    }

    /// The initializers of the model's main graph stored externally, in file order.
    pub fn external_initializers(model: &[u8]) -> anyhow::Result<Vec<External>> {
        let mut found = Vec::new();
        for field in fields(model) {
            let (MODEL_GRAPH, Value::Bytes(graph)) = field? else {
                continue;
            };
            for field in fields(graph) {
                let (GRAPH_INITIALIZER, Value::Bytes(tensor)) = field? else {
                    continue;
                };
                if let Some(init) = tensor_proto(tensor)? {
                    found.push(init);
                }
            }
        }
        Ok(found)
    }

    fn tensor_proto(buf: &[u8]) -> anyhow::Result<Option<External>> {
        let mut init = External::default();
        let mut external = false;
        for field in fields(buf) {
            match field? {
                (TENSOR_DIMS, Value::Varint(d)) => init.dims.push(d as i64),
                (TENSOR_DIMS, Value::Bytes(packed)) => {
                    let mut reader = Reader { buf: packed };
                    while !reader.buf.is_empty() {
                        init.dims.push(reader.varint()? as i64);
                    }
                }
                (TENSOR_DATA_TYPE, Value::Varint(t)) => init.data_type = t,
                (TENSOR_NAME, Value::Bytes(name)) => init.name = text(name)?,
                (TENSOR_DATA_LOCATION, Value::Varint(l)) => external = l == EXTERNAL,
                (TENSOR_EXTERNAL_DATA, Value::Bytes(entry)) => {
                    let (mut key, mut value) = (String::new(), String::new());
                    for field in fields(entry) {
                        match field? {
                            (ENTRY_KEY, Value::Bytes(k)) => key = text(k)?,
                            (ENTRY_VALUE, Value::Bytes(v)) => value = text(v)?,
                            _ => {}
                        }
                    }
                    let number = || {
                        value
                            .parse::<u64>()
                            .with_context(|| format!("external data {key} = '{value}'"))
                    };
                    match key.as_str() {
                        "location" => init.location = value.clone(),
                        "offset" => init.offset = number()?,
                        "length" => init.length = Some(number()?),
                        _ => {}
                    }
                }
                _ => {}
            }
        }
        Ok(external.then_some(init))
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn varint(mut v: u64, out: &mut Vec<u8>) {
            loop {
                let byte = (v & 0x7f) as u8;
                v >>= 7;
                if v == 0 {
                    out.push(byte);
                    return;
                }
                out.push(byte | 0x80);
            }
        }

        fn bytes(number: u32, payload: &[u8], out: &mut Vec<u8>) {
            varint(u64::from(number) << 3 | 2, out);
            varint(payload.len() as u64, out);
            out.extend_from_slice(payload);
        }

        fn int(number: u32, v: u64, out: &mut Vec<u8>) {
            varint(u64::from(number) << 3, out);
            varint(v, out);
        }

        fn entry(key: &str, value: &str) -> Vec<u8> {
            let mut e = Vec::new();
            bytes(ENTRY_KEY, key.as_bytes(), &mut e);
            bytes(ENTRY_VALUE, value.as_bytes(), &mut e);
            e
        }

        #[test]
        fn finds_external_initializers_and_skips_inline_ones() {
            let mut external = Vec::new();
            // dims packed, as protobuf 3 writes them
            let mut dims = Vec::new();
            varint(384, &mut dims);
            varint(1536, &mut dims);
            bytes(TENSOR_DIMS, &dims, &mut external);
            int(TENSOR_DATA_TYPE, 1, &mut external);
            bytes(TENSOR_NAME, b"w", &mut external);
            bytes(
                TENSOR_EXTERNAL_DATA,
                &entry("location", "x.bin"),
                &mut external,
            );
            bytes(
                TENSOR_EXTERNAL_DATA,
                &entry("offset", "4096"),
                &mut external,
            );
            bytes(
                TENSOR_EXTERNAL_DATA,
                &entry("length", "2359296"),
                &mut external,
            );
            int(TENSOR_DATA_LOCATION, EXTERNAL, &mut external);

            let mut inline = Vec::new();
            int(TENSOR_DIMS, 2, &mut inline); // unpacked dims
            int(TENSOR_DATA_TYPE, 7, &mut inline);
            bytes(TENSOR_NAME, b"shape", &mut inline);
            bytes(9, &[0; 16], &mut inline); // raw_data

            let mut graph = Vec::new();
            bytes(1, b"node bytes are skipped", &mut graph);
            bytes(GRAPH_INITIALIZER, &inline, &mut graph);
            bytes(GRAPH_INITIALIZER, &external, &mut graph);
            let mut model = Vec::new();
            int(1, 8, &mut model); // ir_version
            bytes(MODEL_GRAPH, &graph, &mut model);

            let found = external_initializers(&model).unwrap();
            assert_eq!(
                found,
                vec![External {
                    name: "w".into(),
                    data_type: 1,
                    dims: vec![384, 1536],
                    location: "x.bin".into(),
                    offset: 4096,
                    length: Some(2_359_296),
                }]
            );
        }

        #[test]
        fn truncated_or_malformed_bytes_are_errors_not_panics() {
            let mut model = Vec::new();
            bytes(MODEL_GRAPH, &[0x2a, 0x05, 0x0a], &mut model); // initializer claims 5 bytes, has 1
            assert!(external_initializers(&model).is_err());
            assert!(external_initializers(&[0x3a, 0xff]).is_err()); // truncated length
            assert!(external_initializers(&[0x3b]).is_err()); // wire type 3 (groups)
            assert!(external_initializers(&[0xff; 11]).is_err()); // varint too long
            assert!(external_initializers(&[]).unwrap().is_empty());
        }
    }
}
