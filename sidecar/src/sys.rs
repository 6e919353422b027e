//! Process hardening: no core dumps, not ptrace-able, key memory locked.
//! All through rustix's safe wrappers.

use rustix::process::{
    DumpableBehavior, Resource, Rlimit, getrlimit, set_dumpable_behavior, setrlimit,
};

/// What hardening achieved, for the start-up log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hardening {
    /// Core dumps disabled.
    pub no_core_dumps: bool,
    /// All memory locked (no swap).
    pub memory_locked: bool,
    /// Why memory is not locked.
    pub lock_note: Option<String>,
}

/// Disables core dumps (`RLIMIT_CORE = 0`, `PR_SET_DUMPABLE = 0`, which
/// also stops other same-uid processes from ptrace-attaching), and locks
/// memory with `mlockall(MCL_CURRENT | MCL_FUTURE)` per `lock`
/// (`auto`, `required`, `off`).
///
/// `auto` locks only when `RLIMIT_MEMLOCK` is unlimited (or the process is
/// root, whose CAP_IPC_LOCK lifts the limit): with a finite limit
/// `MCL_FUTURE` would make later allocations fail.
pub fn harden(lock: &str) -> Result<Hardening, String> {
    let no_core_dumps = setrlimit(
        Resource::Core,
        Rlimit {
            current: Some(0),
            maximum: Some(0),
        },
    )
    .is_ok()
        && set_dumpable_behavior(DumpableBehavior::NotDumpable).is_ok();
    let mut memory_locked = false;
    let mut lock_note = None;
    if lock != "off" {
        // With CAP_IPC_LOCK (root) the limit does not apply.
        let unlimited =
            getrlimit(Resource::Memlock).current.is_none() || rustix::process::geteuid().is_root();
        if unlimited {
            match rustix::mm::mlockall(
                rustix::mm::MlockAllFlags::CURRENT | rustix::mm::MlockAllFlags::FUTURE,
            ) {
                Ok(()) => memory_locked = true,
                Err(e) => lock_note = Some(format!("mlockall failed: {e}")),
            }
        } else {
            lock_note = Some(
                "RLIMIT_MEMLOCK is finite; raise it (LimitMEMLOCK=infinity) or grant CAP_IPC_LOCK to lock key memory"
                    .into(),
            );
        }
        if lock == "required" && !memory_locked {
            return Err(format!(
                "memory.lock = \"required\" but memory could not be locked: {}",
                lock_note.unwrap_or_default()
            ));
        }
    } else {
        lock_note = Some("disabled by memory.lock = \"off\"".into());
    }
    Ok(Hardening {
        no_core_dumps,
        memory_locked,
        lock_note,
    })
}
