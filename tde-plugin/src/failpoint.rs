//! Failure injection for the end-to-end tests, in debug builds only (release
//! builds compile it to nothing): `TDE_FAILPOINT=NAME:FILE` makes
//! [`panic_if`]`(NAME, path)` panic when `path`'s file name is `FILE`. The
//! tests use it to prove that a panic in a FUSE handler is contained.

use std::path::Path;

/// Panics if the `TDE_FAILPOINT` environment variable names this point and
/// file (debug builds).
#[cfg(debug_assertions)]
pub fn panic_if(name: &str, path: &Path) {
    static SPEC: std::sync::OnceLock<Option<(String, String)>> = std::sync::OnceLock::new();
    let spec = SPEC.get_or_init(|| {
        let v = std::env::var("TDE_FAILPOINT").ok()?;
        let (n, f) = v.split_once(':')?;
        Some((n.to_string(), f.to_string()))
    });
    if let Some((n, f)) = spec
        && n == name
        && path.file_name().is_some_and(|x| x == f.as_str())
    {
        panic!("failpoint {name} hit for {f}");
    }
}

/// Release builds: nothing.
#[cfg(not(debug_assertions))]
#[inline(always)]
pub fn panic_if(_name: &str, _path: &Path) {}
