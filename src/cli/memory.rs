//! One malloc arena for `citygate run` on glibc.
//!
//! glibc gives every thread that allocates an arena of its own, up to eight per core, and each
//! arena keeps what was freed in it for reuse. The gateway's threads (two async workers, the
//! blocking pool that seals and writes the store, sled's flusher) each leave their own
//! high-water mark resident: at 500 meters that was about 3 MB above what a single arena
//! holds, a fifth of the gateway's memory, for no throughput the gateway needs (it spends
//! well under a tenth of one core at that load). glibc reads the arena limit only from the
//! environment at start-up (`MALLOC_ARENA_MAX`; calling `mallopt` would need `unsafe`), so
//! `run` starts itself again, once, with `MALLOC_ARENA_MAX=1` before doing anything else: same
//! process id, arguments, descriptors and environment otherwise. An operator who sets
//! `MALLOC_ARENA_MAX` (any value) keeps theirs; if the re-execution fails the gateway runs on
//! with glibc's default. Other C libraries (musl) are left alone.

/// The arena limit `run` starts itself with.
pub const ARENA_MAX: &str = "1";
const VAR: &str = "MALLOC_ARENA_MAX";

/// Re-executes the current process with [`ARENA_MAX`] arenas unless `MALLOC_ARENA_MAX` is set.
/// Returns only if it did not re-execute (the variable is set, not glibc, or exec failed).
pub fn limit_malloc_arenas() {
    if !cfg!(all(target_os = "linux", target_env = "gnu")) || std::env::var_os(VAR).is_some() {
        return;
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_else(|| exe.clone().into_os_string());
    use std::os::unix::process::CommandExt;
    // `exec` returns only on failure; the gateway then runs with the default arenas.
    let _error = std::process::Command::new(&exe)
        .arg0(arg0)
        .args(args)
        .env(VAR, ARENA_MAX)
        .exec();
}
