//! Failure injection for the end-to-end tests, in debug builds only (release
//! builds compile it to nothing): `TDE_FAILPOINT=NAME:FILE` makes
//! [`hit`]`(NAME, path)` true when `path`'s file name is `FILE`. The tests
//! use it to prove that a panic in a FUSE handler is contained, and that a
//! mount killed in the middle of an overwrite loses nothing fsynced.

use std::path::Path;

/// Whether the `TDE_FAILPOINT` environment variable names this point and
/// file (debug builds).
#[cfg(debug_assertions)]
pub fn hit(name: &str, path: &Path) -> bool {
    static SPEC: std::sync::OnceLock<Option<(String, String)>> = std::sync::OnceLock::new();
    let spec = SPEC.get_or_init(|| {
        let v = std::env::var("TDE_FAILPOINT").ok()?;
        let (n, f) = v.split_once(':')?;
        Some((n.to_string(), f.to_string()))
    });
    spec.as_ref()
        .is_some_and(|(n, f)| n == name && path.file_name().is_some_and(|x| x == f.as_str()))
}

/// Release builds: never.
#[cfg(not(debug_assertions))]
#[inline(always)]
pub fn hit(_name: &str, _path: &Path) -> bool {
    false
}

/// Panics if the failpoint `name` is set for `path`'s file.
pub fn panic_if(name: &str, path: &Path) {
    if hit(name, path) {
        panic!("failpoint {name} hit");
    }
}

/// Ends the process as `kill -9` would, at the point the caller chose.
pub fn die() -> ! {
    let _ = rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::KILL);
    std::process::abort()
}
