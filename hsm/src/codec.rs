//! A minimal big-endian binary codec for sealed records and blobs, with a
//! checked cursor: every length is checked against the bytes present.

use crate::error::HsmError;

/// Appends big-endian values to a buffer.
#[derive(Default)]
pub struct Enc(pub Vec<u8>);

impl Enc {
    /// With room for `n` bytes (records holding key material are sized up
    /// front so the buffer never reallocates and leaves copies behind).
    pub fn with_capacity(n: usize) -> Self {
        Self(Vec::with_capacity(n))
    }
    /// One byte.
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    /// u16 BE.
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    /// u32 BE.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    /// u64 BE.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    /// Raw bytes.
    pub fn raw(&mut self, v: &[u8]) -> &mut Self {
        self.0.extend_from_slice(v);
        self
    }
    /// `u16 length | bytes`; callers keep `v` under 64 KiB.
    pub fn var(&mut self, v: &[u8]) -> &mut Self {
        let n = u16::try_from(v.len()).unwrap_or(u16::MAX);
        self.u16(n).raw(&v[..usize::from(n)])
    }
}

/// Reads big-endian values with bounds checks.
pub struct Dec<'a> {
    rest: &'a [u8],
    what: &'static str,
}

impl<'a> Dec<'a> {
    /// A cursor over `b`; `what` names the structure in errors.
    pub fn new(b: &'a [u8], what: &'static str) -> Self {
        Self { rest: b, what }
    }
    fn err(&self) -> HsmError {
        HsmError::InvalidCiphertext(self.what)
    }
    /// `n` raw bytes.
    pub fn raw(&mut self, n: usize) -> Result<&'a [u8], HsmError> {
        if n > self.rest.len() {
            return Err(self.err());
        }
        let (a, b) = self.rest.split_at(n);
        self.rest = b;
        Ok(a)
    }
    /// One byte.
    pub fn u8(&mut self) -> Result<u8, HsmError> {
        Ok(self.raw(1)?[0])
    }
    /// u16 BE.
    pub fn u16(&mut self) -> Result<u16, HsmError> {
        let b = self.raw(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    /// u32 BE.
    pub fn u32(&mut self) -> Result<u32, HsmError> {
        let b = self.raw(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    /// u64 BE.
    pub fn u64(&mut self) -> Result<u64, HsmError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.raw(8)?);
        Ok(u64::from_be_bytes(a))
    }
    /// `u16 length | bytes`.
    pub fn var(&mut self) -> Result<&'a [u8], HsmError> {
        let n = self.u16()?;
        self.raw(usize::from(n))
    }
    /// `u16 length | UTF-8`.
    pub fn string(&mut self) -> Result<String, HsmError> {
        let b = self.var()?;
        std::str::from_utf8(b)
            .map(str::to_owned)
            .map_err(|_| self.err())
    }
    /// Everything left.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.rest)
    }
    /// Fails unless all bytes were read.
    pub fn finish(&self) -> Result<(), HsmError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(self.err())
        }
    }
}
