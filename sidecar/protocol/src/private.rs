//! The file-mode rule for tde's private files (the key store and its
//! directory, a mount's key file), shared by the daemon, the mount and the
//! CLI: nothing of tde's may be readable or writable by group or others.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// Permission bits that must be clear on a private file or directory.
pub const OTHERS: u32 = 0o077;

/// Checks that `path` (a `what`, e.g. "key store") exists and grants
/// nothing to group or others. The error says what to run.
pub fn check(path: &Path, what: &str) -> Result<(), String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("{what} {}: {e}", path.display()))?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & OTHERS != 0 {
        return Err(format!(
            "{what} {} has mode {mode:04o}: group and others may reach it; \
             refusing to use it (run `chmod {} {}` if that is not expected, and \
             treat what is in it as possibly read)",
            path.display(),
            if meta.is_dir() { "700" } else { "600" },
            path.display()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_or_other_bits_are_refused() {
        let d = std::env::temp_dir().join(format!("tde-private-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("dir");
        let f = d.join("f");
        std::fs::write(&f, b"x").expect("write");
        for (mode, ok) in [
            (0o600, true),
            (0o400, true),
            (0o640, false),
            (0o604, false),
            (0o620, false),
        ] {
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(mode)).expect("chmod");
            assert_eq!(check(&f, "file").is_ok(), ok, "{mode:o}");
        }
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let e = check(&d, "data directory").expect_err("0755");
        assert!(e.contains("0755") && e.contains("chmod 700"), "{e}");
        assert!(check(&d.join("missing"), "x").is_err());
        std::fs::remove_dir_all(&d).expect("clean");
    }
}
