//! The minimal tensor the ops build on: a shape, a dtype, and storage on the CPU or a device.

use crate::device::{Backend, DeviceBuffer, DevicePtr};
use crate::{Error, Result};
use half::{bf16, f16};

/// Element types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    BF16,
    F16,
    U8,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::BF16 | DType::F16 => 2,
            DType::U8 => 1,
        }
    }
}

/// Host data, typed so that slices are aligned for their element type.
#[derive(Debug, Clone, PartialEq)]
pub enum HostData {
    F32(Vec<f32>),
    BF16(Vec<bf16>),
    F16(Vec<f16>),
    U8(Vec<u8>),
}

impl HostData {
    pub fn dtype(&self) -> DType {
        match self {
            HostData::F32(_) => DType::F32,
            HostData::BF16(_) => DType::BF16,
            HostData::F16(_) => DType::F16,
            HostData::U8(_) => DType::U8,
        }
    }
    pub fn len(&self) -> usize {
        match self {
            HostData::F32(v) => v.len(),
            HostData::BF16(v) => v.len(),
            HostData::F16(v) => v.len(),
            HostData::U8(v) => v.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            HostData::F32(v) => bytemuck::cast_slice(v),
            HostData::BF16(v) => bytemuck::cast_slice(v),
            HostData::F16(v) => bytemuck::cast_slice(v),
            HostData::U8(v) => v,
        }
    }
    fn from_bytes(dtype: DType, bytes: &[u8]) -> Self {
        // pod_collect_to_vec copies, so the unaligned source byte buffer is fine.
        match dtype {
            DType::F32 => HostData::F32(bytemuck::pod_collect_to_vec(bytes)),
            DType::BF16 => HostData::BF16(bytemuck::pod_collect_to_vec(bytes)),
            DType::F16 => HostData::F16(bytemuck::pod_collect_to_vec(bytes)),
            DType::U8 => HostData::U8(bytes.to_vec()),
        }
    }
    /// Values widened to f32 (U8 as its integer value).
    pub fn to_f32(&self) -> Vec<f32> {
        match self {
            HostData::F32(v) => v.clone(),
            HostData::BF16(v) => v.iter().map(|x| x.to_f32()).collect(),
            HostData::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
            HostData::U8(v) => v.iter().map(|&x| x as f32).collect(),
        }
    }
}

#[derive(Debug)]
pub enum Storage {
    Cpu(HostData),
    Device(DeviceBuffer),
}

/// A dense row-major tensor.
#[derive(Debug)]
pub struct Tensor {
    shape: Vec<usize>,
    dtype: DType,
    storage: Storage,
}

impl Tensor {
    /// A host tensor; errors when `data` does not have `shape`'s element count.
    pub fn from_host(shape: &[usize], data: HostData) -> Result<Self> {
        let numel: usize = shape.iter().product();
        if numel != data.len() {
            return Err(Error::shape(
                "Tensor::from_host",
                format!("shape {shape:?} needs {numel} elements, got {}", data.len()),
            ));
        }
        Ok(Tensor { shape: shape.to_vec(), dtype: data.dtype(), storage: Storage::Cpu(data) })
    }
    /// An uninitialised tensor on `backend` (zeros on the CPU; on a device, whatever was there —
    /// the simulator fills fresh memory with NaN so unwritten outputs show).
    pub fn empty(shape: &[usize], dtype: DType, backend: &Backend) -> Result<Self> {
        let numel: usize = shape.iter().product();
        let storage = match backend {
            Backend::Cpu => Storage::Cpu(HostData::from_bytes(dtype, &vec![0u8; numel * dtype.size()])),
            Backend::Device(d) => Storage::Device(DeviceBuffer::new(d, numel * dtype.size())?),
        };
        Ok(Tensor { shape: shape.to_vec(), dtype, storage })
    }
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn size_bytes(&self) -> usize {
        self.numel() * self.dtype.size()
    }
    pub fn storage(&self) -> &Storage {
        &self.storage
    }
    /// The device address of the first element, or an error for a host tensor.
    pub fn device_ptr(&self) -> Result<DevicePtr> {
        match &self.storage {
            Storage::Device(b) => Ok(b.ptr()),
            Storage::Cpu(_) => Err(Error::Device("tensor is on the CPU, a device tensor is needed".into())),
        }
    }
    /// A copy on `backend`.
    pub fn to_backend(&self, backend: &Backend) -> Result<Tensor> {
        let host = self.to_host()?;
        let storage = match backend {
            Backend::Cpu => Storage::Cpu(host),
            Backend::Device(d) => Storage::Device(DeviceBuffer::from_host(d, host.as_bytes())?),
        };
        Ok(Tensor { shape: self.shape.clone(), dtype: self.dtype, storage })
    }
    /// The data, copied to the host.
    pub fn to_host(&self) -> Result<HostData> {
        match &self.storage {
            Storage::Cpu(h) => Ok(h.clone()),
            Storage::Device(b) => Ok(HostData::from_bytes(self.dtype, &b.to_host()?)),
        }
    }
    /// Fills every byte with `value` (e.g. 0xFF: NaN for f32/bf16/f16, to catch unwritten outputs).
    pub fn fill_bytes(&mut self, value: u8) -> Result<()> {
        match &mut self.storage {
            Storage::Device(b) => b.fill(value),
            Storage::Cpu(h) => {
                let n = h.as_bytes().len();
                *h = HostData::from_bytes(self.dtype, &vec![value; n]);
                Ok(())
            }
        }
    }
}
