//! Randomness from the operating system's CSPRNG (getrandom(2)).

use crate::error::HsmError;

/// Fills `buf` from the OS CSPRNG.
pub fn fill(buf: &mut [u8]) -> Result<(), HsmError> {
    getrandom::fill(buf).map_err(|_| HsmError::Internal("the OS random source failed"))
}

/// Returns `n` random bytes.
pub fn bytes(n: usize) -> Result<Vec<u8>, HsmError> {
    let mut v = vec![0u8; n];
    fill(&mut v)?;
    Ok(v)
}
