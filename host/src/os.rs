//! What Kiln asks of the operating system beside the standard library: the calling thread's CPU
//! time (what a plugin's CPU limit counts) and the C allocator's settings and trimming. A leaf
//! module: every layer may use it, it uses none of them.

use std::time::Duration;

/// The CPU time the calling thread has used (`CLOCK_THREAD_CPUTIME_ID`): what a plugin's CPU
/// limit counts. Unlike wall time it does not grow while the thread waits for a core on a busy
/// machine, so one tenant's load cannot make another tenant's plugin look like a runaway loop.
pub fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a valid pointer; the thread CPU clock
    // exists on every Linux kernel Kiln supports.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Makes glibc's malloc use one arena for every thread (unless the operator set
/// `MALLOC_ARENA_MAX` or `GLIBC_TUNABLES`, which then decide). Call it before any thread starts.
///
/// Why: with an arena per thread, the free memory at the top of each extra arena stays resident
/// however long the server idles. glibc trims an extra arena's top only when a free there
/// leaves more than the trim threshold (which grows with the largest block seen, up to 64 MiB),
/// and `malloc_trim` ([`release_freed_memory`]) releases the top of the main arena alone.
/// Measured on the 2-core VM (`cargo xtask bench peers`, Kiln alone, MiniLM, 2 rounds each,
/// interleaved): RSS at rest after the runs 292-310 MiB with an arena per thread, 107 MiB with
/// one, at the same req/s (c=32: 263 vs 263; 8 sentences: 23.2-24.2 vs 23.5-23.7). A fixed
/// 1 MiB mmap threshold instead gave 123 MiB but lost 10% with 8 sentences (every large
/// activation a fresh mapping). On many cores one arena may contend; set `MALLOC_ARENA_MAX`.
pub fn use_one_malloc_arena() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none()
        && std::env::var_os("GLIBC_TUNABLES").is_none()
    {
        // SAFETY: mallopt only changes the allocator's own settings; M_ARENA_MAX takes effect
        // for threads that have no arena yet (all but this one, before any other starts).
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
    }
}

/// Hands memory that has been freed but is still held by the C allocator back to the OS.
///
/// glibc keeps freed blocks in its arenas: after a model load or a burst of large ONNX Runtime
/// runs, tens to hundreds of MiB stay resident for nothing. `malloc_trim` releases the free
/// pages inside every arena and the top of the main one (see [`use_one_malloc_arena`]). It takes
/// about a millisecond, so it runs after loads and when the server goes idle, never per request.
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free pages of the allocator's own arenas.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Raises the soft limit of open files to the hard limit (a server holds one per connection;
/// the usual soft limit, 1024, is far below what `max_connections` allows) and returns it.
pub fn raise_open_files_limit() -> u64 {
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 0;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                return raised.rlim_cur;
            }
        }
        limit.rlim_cur
    }
}

#[cfg(test)]
mod cpu_clock_tests {
    use super::thread_cpu_time;
    use std::time::{Duration, Instant};

    #[test]
    fn the_thread_cpu_clock_counts_work_not_waiting() {
        let before = thread_cpu_time();
        std::thread::sleep(Duration::from_millis(200));
        let slept = thread_cpu_time() - before;
        assert!(
            slept < Duration::from_millis(50),
            "sleeping used {slept:?} of CPU"
        );

        let before = thread_cpu_time();
        let started = Instant::now();
        let mut x = 0u64;
        while started.elapsed() < Duration::from_millis(200) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        let worked = thread_cpu_time() - before;
        // On a loaded machine the thread gets less than the whole 200 ms, never more.
        assert!(
            worked > Duration::from_millis(20),
            "spinning used only {worked:?}"
        );
        assert!(
            worked <= started.elapsed() + Duration::from_millis(5),
            "{worked:?}"
        );
    }
}
