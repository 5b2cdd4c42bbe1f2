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
//! initializer of [`EXTERNAL_MIN_BYTES`] or more to an external data file beside it. Every
//! session of the graph then loads the optimized model with optimization off, given those
//! initializers as shared ones (`AddInitializer`, which ORT uses in place, without a copy) and
//! one prepacked-weights container (ORT shares prepacked buffers between sessions only for
//! shared initializers). The shared initializers are views of a read-only mapping of the data
//! file (copies, for the few at unaligned offsets); once the sessions exist, the mapping's pages
//! leave the process ([`SharedWeights::sessions_created`]) and only what ORT reads again comes
//! back: MatMul weights are used in their prepacked form, a word-embedding table a row per
//! token seen.
//!
//! Measured on MiniLM int8 with three sessions: 86 MiB shared (in memory) plus 51, 11 and 11 MiB
//! for the sessions, against ~137 MiB for each session alone; same speed, identical outputs.
//! With the mapping, the server rests at ~132 MiB after a burst instead of ~220 (docs/
//! benchmarks.md, "Memory"). If any step fails the graph's sessions load the model file each
//! on their own, as before, and the reason is logged.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context};
use ort::session::builder::{GraphOptimizationLevel, PrepackedWeights, SessionBuilder};
use ort::value::{DynValue, DynValueRefMut, TensorElementType};

/// Initializers this large or larger are shared. Smaller ones (biases, scales, shape constants)
/// stay inside the optimized model and each session keeps its own copy: they add up to a few
/// KiB, and ORT's optimizer reads them as constants.
pub const EXTERNAL_MIN_BYTES: usize = 4096;

/// The file names inside the temporary folder.
const MODEL_FILE: &str = "optimized.onnx";
/// Each temporary folder is `<temp dir>/kiln-optimized-<process id>-<n>`.
const FOLDER_PREFIX: &str = "kiln-optimized-";
const DATA_FILE: &str = "optimized.weights";

/// The optimized model of one graph and its large weights, ready to give to each session.
///
/// Weights stored in the external data file at 64-byte aligned offsets (all the large ones:
/// ORT aligns them) are not copied: ORT reads them from a read-only mapping of the file. Once
/// every session is created, [`Self::sessions_created`] drops the mapping's pages from the
/// process; ORT faults back in only what it reads again. MatMul weights are used only in their
/// prepacked form (held by the shared container), and a word-embedding table only in the rows
/// of the tokens seen, so most of the folded weights stop occupying memory (MiniLM: ~86 MiB).
/// A session must not outlive this (each worker holds an `Arc` of it).
pub struct SharedWeights {
    folder: Mutex<Option<TempFolder>>,
    model: PathBuf,
    /// Declared before `mapping`: dropped first.
    values: Vec<Named>,
    mapping: Option<Mapping>,
    prepacked: PrepackedWeights,
}

/// A shared initializer and its name.
type Named = (String, Shared);

/// A shared initializer: a copy ORT does not own, or a view of the mapped file.
enum Shared {
    Owned(Arc<DynValue>),
    Mapped(DynValueRefMut<'static>),
}

/// A read-only, private mapping of the external data file.
struct Mapping {
    ptr: *mut libc::c_void,
    len: usize,
    file: File,
}

// SAFETY: the mapping is read-only memory owned by this value; reading it from any thread is
// fine, and it is unmapped once, on drop.
unsafe impl Send for Mapping {}
unsafe impl Sync for Mapping {}

impl Mapping {
    fn new(file: File) -> anyhow::Result<Option<Self>> {
        let len = usize::try_from(file.metadata()?.len())?;
        if len == 0 {
            return Ok(None);
        }
        // SAFETY: a fresh mapping of a file we just wrote and only read; checked for failure.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                std::os::fd::AsRawFd::as_raw_fd(&file),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            bail!("mapping the weights: {}", std::io::Error::last_os_error());
        }
        // Reads are scattered (a word-embedding table is read by rows): no read-ahead or
        // fault-around, which mapped ~0.7 MiB around each row (measured on MiniLM).
        // SAFETY: advice on the mapping just made.
        unsafe { libc::madvise(ptr, len, libc::MADV_RANDOM) };
        Ok(Some(Self { ptr, len, file }))
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: mapped in `new` with this length; nothing reads it any more (the ORT values
        // over it and the sessions using them are gone).
        unsafe { libc::munmap(self.ptr, self.len) };
    }
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
        let (values, mapping) = read_external_initializers(&bytes, &data)?;
        Ok(Self {
            folder: Mutex::new(Some(folder)),
            model,
            values,
            mapping,
            prepacked: PrepackedWeights::new(),
        })
    }

    /// The optimized model file, to give to [`SessionBuilder::commit_from_file`] after
    /// [`Self::apply`].
    pub fn model(&self) -> &Path {
        &self.model
    }

    /// Every session is created: the temporary files go (the mapping keeps its data), and the
    /// mapped weights' pages leave the process until ORT reads them again.
    pub fn sessions_created(&self) {
        drop(self.folder.lock().unwrap_or_else(|e| e.into_inner()).take());
        if let Some(m) = &self.mapping {
            // SAFETY: a private read-only file mapping: dropping its pages loses nothing, the
            // next read faults them back in from the file.
            unsafe { libc::madvise(m.ptr, m.len, libc::MADV_DONTNEED) };
            // The file's page cache holds it in large folios (2 MiB here, written at once),
            // and a fault maps a whole folio: each embedding row read cost 2 MiB of resident
            // memory. Written back and dropped from the cache, the file is read again a page
            // at a time (MADV_RANDOM: no read-ahead).
            let _ = m.file.sync_data();
            // SAFETY: advice on an open file descriptor.
            unsafe {
                libc::posix_fadvise(
                    std::os::fd::AsRawFd::as_raw_fd(&m.file),
                    0,
                    0,
                    libc::POSIX_FADV_DONTNEED,
                )
            };
        }
    }

    /// Sets a session up to use the shared weights: no further optimization (the model is
    /// already optimized), the shared initializers, the shared prepacked weights.
    pub fn apply(&self, builder: SessionBuilder) -> ort::Result<SessionBuilder> {
        let mut builder = builder
            .with_optimization_level(GraphOptimizationLevel::Disable)?
            .with_prepacked_weights(&self.prepacked)?;
        for (name, value) in &self.values {
            match value {
                Shared::Owned(value) => {
                    builder = builder.with_initializer(name, Arc::clone(value))?;
                }
                Shared::Mapped(value) => add_initializer(&mut builder, name, value)?,
            }
        }
        Ok(builder)
    }

    /// Number and total bytes of the shared initializers.
    pub fn size(&self) -> (usize, u64) {
        let bytes = self
            .values
            .iter()
            .map(|(_, v)| match v {
                Shared::Owned(v) => value_bytes(v),
                Shared::Mapped(v) => value_bytes(v),
            })
            .sum();
        (self.values.len(), bytes)
    }
}

/// ORT's `AddInitializer` for a value the `ort` crate cannot take (a view of memory it does
/// not own): ORT keeps the pointer until the session is created, then its own reference to the
/// tensor; the memory must outlive the session ([`SharedWeights`] does).
fn add_initializer(
    builder: &mut SessionBuilder,
    name: &str,
    value: &DynValueRefMut<'static>,
) -> ort::Result<()> {
    use ort::AsPointer;
    let name = std::ffi::CString::new(name)
        .map_err(|_| ort::Error::new(format!("initializer name {name:?} has a NUL byte")))?;
    let api = ort::api();
    // SAFETY: live session options, a NUL-terminated name, a live value; a returned status is
    // read and released here.
    unsafe {
        let status = (api.AddInitializer)(builder.ptr_mut(), name.as_ptr(), value.ptr());
        if !status.0.is_null() {
            let message = std::ffi::CStr::from_ptr((api.GetErrorMessage)(status.0))
                .to_string_lossy()
                .into_owned();
            (api.ReleaseStatus)(status.0);
            return Err(ort::Error::new(message));
        }
    }
    Ok(())
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
        static CLEANED: std::sync::Once = std::sync::Once::new();
        let dir = std::env::temp_dir();
        CLEANED.call_once(|| {
            remove_stale_folders(&dir);
        });
        let path = dir.join(format!(
            "{FOLDER_PREFIX}{}-{}",
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

/// Removes the temporary folders in `dir` of Kiln processes that are gone: a server killed
/// while it loaded a model left its folder behind (the optimized model and its weights, 86 MB
/// for MiniLM). A folder whose process id is in use (by any process) is left alone. Returns how
/// many were removed.
fn remove_stale_folders(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let pid = name
            .to_str()
            .and_then(|n| n.strip_prefix(FOLDER_PREFIX))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok());
        let Some(pid) = pid else {
            continue;
        };
        let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        if !is_dir || pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        match std::fs::remove_dir_all(entry.path()) {
            Ok(()) => {
                tracing::info!(folder = %entry.path().display(), "removed the optimized model a stopped server left");
                removed += 1;
            }
            Err(e) => {
                tracing::warn!(folder = %entry.path().display(), "a stopped server's optimized model stays: {e}")
            }
        }
    }
    removed
}

#[cfg(test)]
mod folder_tests {
    use super::*;

    /// Folders of gone processes go; those of running ones (this one, init) and anything else
    /// stay.
    #[test]
    fn only_the_folders_of_gone_processes_are_removed() {
        let dir = std::env::temp_dir().join(format!("kiln-stale-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let folder = |name: &str| {
            let path = dir.join(name);
            std::fs::create_dir_all(&path).unwrap();
            std::fs::write(path.join(DATA_FILE), b"weights").unwrap();
            path
        };
        // Above any Linux pid_max (2^22): no process has this id.
        let gone = folder(&format!("{FOLDER_PREFIX}4000000000-0"));
        let mine = folder(&format!("{FOLDER_PREFIX}{}-3", std::process::id()));
        let init = folder(&format!("{FOLDER_PREFIX}1-0"));
        let other = folder("kiln-optimized-notapid-0");
        let unrelated = folder("something-else");
        std::fs::write(dir.join(format!("{FOLDER_PREFIX}4000000001-0")), b"a file").unwrap();

        assert_eq!(remove_stale_folders(&dir), 1);
        assert!(!gone.exists());
        for kept in [&mine, &init, &other, &unrelated] {
            assert!(kept.exists(), "{}", kept.display());
        }
        assert!(dir.join(format!("{FOLDER_PREFIX}4000000001-0")).exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// ORT writes no data file for a graph without a large initializer: nothing to share, and
    /// no error (which made every session of such a graph optimize it again on its own).
    #[test]
    fn a_model_without_large_initializers_needs_no_data_file() {
        let missing = std::env::temp_dir()
            .join(format!("kiln-no-weights-test-{}", std::process::id()))
            .join(DATA_FILE);
        let (values, mapping) = read_external_initializers(&[], &missing).unwrap();
        assert!(values.is_empty() && mapping.is_none());
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
) -> anyhow::Result<(Vec<Named>, Option<Mapping>)> {
    let externals = proto::external_initializers(model)?;
    // ORT (1.31) writes the data file only when some initializer is `EXTERNAL_MIN_BYTES` or
    // larger: a small graph (the test fixtures) has no file, and no weights to share.
    if externals.is_empty() {
        return Ok((Vec::new(), None));
    }
    let mapping =
        Mapping::new(File::open(data).with_context(|| format!("opening {}", data.display()))?)?;
    let file = File::open(data)?;
    use TensorElementType as T;
    let mut values = Vec::new();
    for init in externals {
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
        // Aligned, in the file: a view of the mapping.
        if let Some(m) = mapping.as_ref().filter(|_| init.offset % 64 == 0) {
            let end = init.offset.checked_add(bytes as u64);
            if end.is_none_or(|end| end > m.len as u64) {
                bail!(
                    "initializer '{}' runs past the end of {DATA_FILE}",
                    init.name
                );
            }
            // SAFETY: in bounds (checked above) of a mapping that outlives the value (both
            // live in `SharedWeights`, the value dropped first), aligned for any element type.
            let ptr = unsafe { m.ptr.cast::<u8>().add(init.offset as usize) };
            let value = unsafe { mapped(ty, ptr.cast(), init.dims.clone()) }?;
            values.push((init.name, Shared::Mapped(value)));
            continue;
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
        values.push((init.name, Shared::Owned(Arc::new(value))));
    }
    Ok((values, mapping))
}

/// A tensor over `count` elements at `ptr`, memory ORT does not own.
///
/// # Safety
/// `ptr` must point to the tensor's bytes, aligned, and outlive the value.
unsafe fn mapped(
    ty: TensorElementType,
    ptr: *mut std::ffi::c_void,
    dims: Vec<i64>,
) -> ort::Result<DynValueRefMut<'static>> {
    use ort::memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType};
    use ort::value::TensorRefMut;
    use TensorElementType as T;
    let info = MemoryInfo::new(
        AllocationDevice::CPU,
        0,
        AllocatorType::Device,
        MemoryType::Default,
    )?;
    let shape = ort::value::Shape::new(dims);
    // SAFETY: as the caller promises.
    unsafe {
        Ok(match ty {
            T::Float32 => TensorRefMut::<f32>::from_raw(info, ptr, shape)?.into_dyn(),
            T::Float64 => TensorRefMut::<f64>::from_raw(info, ptr, shape)?.into_dyn(),
            T::Float16 => TensorRefMut::<half::f16>::from_raw(info, ptr, shape)?.into_dyn(),
            T::Bfloat16 => TensorRefMut::<half::bf16>::from_raw(info, ptr, shape)?.into_dyn(),
            T::Int8 => TensorRefMut::<i8>::from_raw(info, ptr, shape)?.into_dyn(),
            T::Uint8 => TensorRefMut::<u8>::from_raw(info, ptr, shape)?.into_dyn(),
            T::Int16 => TensorRefMut::<i16>::from_raw(info, ptr, shape)?.into_dyn(),
            T::Uint16 => TensorRefMut::<u16>::from_raw(info, ptr, shape)?.into_dyn(),
            T::Int32 => TensorRefMut::<i32>::from_raw(info, ptr, shape)?.into_dyn(),
            T::Uint32 => TensorRefMut::<u32>::from_raw(info, ptr, shape)?.into_dyn(),
            T::Int64 => TensorRefMut::<i64>::from_raw(info, ptr, shape)?.into_dyn(),
            T::Uint64 => TensorRefMut::<u64>::from_raw(info, ptr, shape)?.into_dyn(),
            other => return Err(ort::Error::new(format!("no view for {other:?}"))),
        })
    }
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
