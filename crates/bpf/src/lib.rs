//! leakscope-bpf: what the eBPF programs of leakscope share.
//!
//! - `build::skeleton` (feature `build`, for build.rs): compiles a
//!   `.bpf.c` with clang against the shared `vmlinux.h` (CO-RE:
//!   one header serves every kernel) and generates the libbpf-rs skeleton.
//! - Loader helpers: [`quiet_libbpf`], [`ensure_tracefs`],
//!   [`is_permission`], [`attach_all`], [`detach_all`], [`Detaching`], [`percpu_sum`],
//!   [`monotonic_ns`].
//! - Ring-buffer records: [`Pod`], [`read`], [`cstr`].
//!
//! It does not: know any program's maps or records.
#![deny(missing_docs)]

use std::io;

use libbpf_rs::{Link, MapCore, MapFlags, Object};

/// Build-time helper (feature `build`).
#[cfg(feature = "build")]
pub mod build {
    use std::{env, path::PathBuf};

    /// Compiles `src` (relative to the calling crate) into `OUT_DIR/<name>.skel.rs`.
    /// clang comes from `LEAKSCOPE_CLANG` or `clang` on PATH (scripts/setup
    /// installs it). Panics with a readable message: this runs in build.rs.
    pub fn skeleton(src: &str, name: &str, extra_deps: &[&str]) {
        let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR is set by cargo"))
            .join(format!("{name}.skel.rs"));
        let arch = env::var("CARGO_CFG_TARGET_ARCH").expect("target arch");
        let arch = match arch.as_str() {
            "x86_64" => "x86",
            "aarch64" => "arm64",
            other => other,
        };
        let include = concat!(env!("CARGO_MANIFEST_DIR"), "/../ebpf/src/bpf");
        let src_dir = PathBuf::from(src)
            .parent()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| ".".into());
        let clang = env::var("LEAKSCOPE_CLANG").unwrap_or_else(|_| "clang".into());
        if let Err(e) = libbpf_cargo::SkeletonBuilder::new()
            .source(src)
            .clang(&clang)
            .clang_args([
                format!("-D__TARGET_ARCH_{arch}"),
                "-Wall".into(),
                // Atomic fetch-and-add results need BPF ISA v3.
                "-mcpu=v3".into(),
                "-Wno-unused-function".into(),
                format!("-I{src_dir}"),
                format!("-I{include}"),
            ])
            .build_and_generate(&out)
        {
            panic!(
                "building the BPF program {src} with `{clang}` failed: {e:#}\n\
                 (run scripts/setup to install clang, or set LEAKSCOPE_CLANG)"
            );
        }
        println!("cargo:rerun-if-changed={src}");
        for dep in extra_deps {
            println!("cargo:rerun-if-changed={dep}");
        }
        println!("cargo:rerun-if-changed={include}/vmlinux.h");
        println!("cargo:rerun-if-changed={include}/common.bpf.h");
        println!("cargo:rerun-if-env-changed=LEAKSCOPE_CLANG");
    }
}

/// Silences libbpf's own multi-line logging (errors come back as values
/// and are reported in one line) unless `LEAKSCOPE_DEBUG` is set.
pub fn quiet_libbpf() {
    if std::env::var_os("LEAKSCOPE_DEBUG").is_none() {
        libbpf_rs::set_print(None);
    }
}

/// Makes sure tracefs is mounted (syscall and sched tracepoints live there),
/// mounting it at /sys/kernel/tracing if it is not.
pub fn ensure_tracefs() -> io::Result<()> {
    // Look in the mount table rather than at the directory: without
    // privileges the directory is unreadable even when mounted, and the
    // load that follows then explains the real problem (permissions).
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(2) == Some("tracefs"))
    {
        return Ok(());
    }
    let src = c"tracefs";
    let target = c"/sys/kernel/tracing";
    // SAFETY: valid NUL-terminated strings.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            src.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether libbpf failed because the kernel refused us (no CAP_BPF, ...).
pub fn is_permission(e: &libbpf_rs::Error) -> bool {
    if e.to_string().contains("Operation not permitted") {
        return true;
    }
    // The verifier rejects a program with EACCES too: as root, that is
    // what EACCES means (missing capabilities give EPERM).
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    matches!(e.kind(), libbpf_rs::ErrorKind::PermissionDenied) && !root
}

/// Why leakscope's eBPF programs could not be loaded or attached; the
/// crates that own a program wrap it in their own error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// Loading or attaching BPF programs was refused.
    #[error(
        "loading eBPF programs was refused ({source}): this needs root or \
         CAP_BPF+CAP_PERFMON (run leakscope with sudo)"
    )]
    Permission {
        /// What libbpf said.
        source: libbpf_rs::Error,
    },
    /// tracefs is missing and could not be mounted.
    #[error(
        "tracefs is not mounted and mounting it failed ({0}); run \
         `mount -t tracefs tracefs /sys/kernel/tracing`"
    )]
    Tracefs(io::Error),
    /// libbpf failed for another reason (the verifier, a missing kernel
    /// feature, ...).
    #[error("eBPF {what} failed")]
    Bpf {
        /// Which step.
        what: &'static str,
        /// What libbpf said.
        #[source]
        source: libbpf_rs::Error,
    },
}

impl LoadError {
    /// Classifies a libbpf failure at step `what`.
    pub fn libbpf(what: &'static str, source: libbpf_rs::Error) -> LoadError {
        if is_permission(&source) {
            LoadError::Permission { source }
        } else {
            LoadError::Bpf { what, source }
        }
    }
}

/// `map_err` for a libbpf step: `.map_err(step("attach"))?`.
pub fn step(what: &'static str) -> impl FnOnce(libbpf_rs::Error) -> LoadError {
    move |source| LoadError::libbpf(what, source)
}

/// Waits up to `timeout` for ring-buffer records and hands them to the
/// ring's callbacks. A signal (Ctrl-C, which callers forward to the traced
/// program) or a ptrace stop interrupts epoll_wait(2), which is never
/// restarted: that is a wait that ended early, not an error.
pub fn poll_ring(
    ring: &libbpf_rs::RingBuffer<'_>,
    timeout: std::time::Duration,
) -> Result<(), LoadError> {
    match ring.poll(timeout) {
        Err(e) if e.kind() != libbpf_rs::ErrorKind::Interrupted => {
            Err(LoadError::libbpf("ring buffer poll", e))
        }
        _ => Ok(()),
    }
}

/// A user stack that a BPF program copied: registers at the call, then
/// `data`, of which the first `len` bytes are the stack from `sp` up.
pub fn copied_stack(ip: u64, sp: u64, bp: u64, len: u32, data: &[u8]) -> leakscope_event::RawStack {
    use leakscope_event::RawStack;
    if len == 0 {
        return RawStack::Missing("the user stack was not readable".into());
    }
    RawStack::Copied {
        ip,
        sp,
        bp,
        bytes: data[..(len as usize).min(data.len())].to_vec(),
    }
}

/// The number of syscall `name` on the target architecture, from libc's
/// constants: what the programs' `sc_of` tables are filled with. None for a
/// name the architecture lacks (arm64 has no open, creat, pipe, dup2, ...).
pub fn syscall_nr(name: &str) -> Option<u32> {
    use libc::*;
    let nr = match name {
        "openat" => SYS_openat,
        "openat2" => SYS_openat2,
        "open_by_handle_at" => SYS_open_by_handle_at,
        "socket" => SYS_socket,
        "socketpair" => SYS_socketpair,
        "accept" => SYS_accept,
        "accept4" => SYS_accept4,
        "connect" => SYS_connect,
        "bind" => SYS_bind,
        "listen" => SYS_listen,
        "shutdown" => SYS_shutdown,
        "recvmsg" => SYS_recvmsg,
        "recvmmsg" => SYS_recvmmsg,
        "pipe2" => SYS_pipe2,
        "dup" => SYS_dup,
        "dup3" => SYS_dup3,
        "fcntl" => SYS_fcntl,
        "eventfd2" => SYS_eventfd2,
        "epoll_create1" => SYS_epoll_create1,
        "timerfd_create" => SYS_timerfd_create,
        "signalfd4" => SYS_signalfd4,
        "inotify_init1" => SYS_inotify_init1,
        "memfd_create" => SYS_memfd_create,
        "memfd_secret" => SYS_memfd_secret,
        "pidfd_open" => SYS_pidfd_open,
        "pidfd_getfd" => SYS_pidfd_getfd,
        "fanotify_init" => SYS_fanotify_init,
        "userfaultfd" => SYS_userfaultfd,
        "perf_event_open" => SYS_perf_event_open,
        "bpf" => SYS_bpf,
        "close" => SYS_close,
        "close_range" => SYS_close_range,
        "mmap" => SYS_mmap,
        "unlinkat" => SYS_unlinkat,
        "renameat" => SYS_renameat,
        "renameat2" => SYS_renameat2,
        #[cfg(target_arch = "x86_64")]
        "open" => SYS_open,
        #[cfg(target_arch = "x86_64")]
        "creat" => SYS_creat,
        #[cfg(target_arch = "x86_64")]
        "pipe" => SYS_pipe,
        #[cfg(target_arch = "x86_64")]
        "dup2" => SYS_dup2,
        #[cfg(target_arch = "x86_64")]
        "eventfd" => SYS_eventfd,
        #[cfg(target_arch = "x86_64")]
        "epoll_create" => SYS_epoll_create,
        #[cfg(target_arch = "x86_64")]
        "signalfd" => SYS_signalfd,
        #[cfg(target_arch = "x86_64")]
        "inotify_init" => SYS_inotify_init,
        #[cfg(target_arch = "x86_64")]
        "unlink" => SYS_unlink,
        #[cfg(target_arch = "x86_64")]
        "rename" => SYS_rename,
        _ => return None,
    };
    Some(nr as u32)
}

/// Attaches every program of `object`.
pub fn attach_all(object: &Object) -> Result<Vec<Link>, libbpf_rs::Error> {
    object.progs_mut().map(|p| p.attach()).collect()
}

/// Detaches `links`. Each detach waits for an RCU grace period (~40-75 ms
/// on the machines we measured); concurrent detaches overlap that wait.
pub fn detach_all(links: &mut Vec<Link>) {
    drop(Detaching::start(links));
}

/// Links being detached on background threads, so that the wait overlaps
/// other work (building the report); dropping it waits for the end.
#[derive(Debug, Default)]
pub struct Detaching(Vec<std::thread::JoinHandle<()>>);

impl Detaching {
    /// Starts detaching every link of `links` (leaving it empty).
    pub fn start(links: &mut Vec<Link>) -> Detaching {
        Detaching(
            links
                .drain(..)
                .map(|link| std::thread::spawn(move || drop(link)))
                .collect(),
        )
    }

    /// Detaches `links` in a short-lived child process instead, so that
    /// not even leakscope's exit waits for it: the child inherits the
    /// link fds, closes every fd it has (stdio first, so no pipe reader
    /// waits for it) and exits; this process's copies then close at once.
    /// Falls back to [`Detaching::start`] if fork fails.
    pub fn hand_off(links: &mut Vec<Link>) -> Detaching {
        if links.is_empty() {
            return Detaching::default();
        }
        // SAFETY: the child calls only async-signal-safe functions
        // (close_range, close, _exit) before it exits.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: see above; nothing of this process's state is used.
            unsafe {
                if libc::syscall(libc::SYS_close_range, 0u32, u32::MAX, 0u32) != 0 {
                    for fd in 0..65536 {
                        libc::close(fd);
                    }
                }
                libc::_exit(0);
            }
        }
        if pid < 0 {
            return Detaching::start(links);
        }
        links.clear();
        Detaching::default()
    }
}

impl Drop for Detaching {
    fn drop(&mut self) {
        for h in self.0.drain(..) {
            let _ = h.join();
        }
    }
}

/// The sum over CPUs of slot `index` of a per-CPU array of u64 counters.
pub fn percpu_sum(map: &dyn MapCore, index: u32) -> u64 {
    match map.lookup_percpu(&index.to_ne_bytes(), MapFlags::ANY) {
        Ok(Some(per_cpu)) => per_cpu
            .iter()
            .map(|v| u64::from_ne_bytes(v[..8].try_into().unwrap_or([0; 8])))
            .sum(),
        _ => 0,
    }
}

/// CLOCK_MONOTONIC in nanoseconds, the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Plain-old-data records that may be read from any byte pattern.
///
/// # Safety
/// Implementors must be `repr(C)` structs of integers and arrays of integers.
pub unsafe trait Pod: Copy {}

/// Reads a record from the front of `bytes`, or None if it is too short.
pub fn read<T: Pod>(bytes: &[u8]) -> Option<T> {
    if bytes.len() < std::mem::size_of::<T>() {
        return None;
    }
    // SAFETY: T is Pod (any bit pattern is valid) and the length was checked.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

/// A NUL-terminated C string from a fixed buffer.
pub fn cstr(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}
