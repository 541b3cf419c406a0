//! leakscope-bpf: what the eBPF programs of leakscope share.
//!
//! - `build::skeleton` (feature `build`, for build.rs): compiles a
//!   `.bpf.c` with clang against the shared `vmlinux.h` (CO-RE:
//!   one header serves every kernel) and generates the libbpf-rs skeleton.
//! - Loader helpers: [`quiet_libbpf`], [`request_verifier_log`],
//!   [`ensure_tracefs`], [`is_permission`], [`attach_all`], [`detach_all`],
//!   [`Detaching`], [`percpu_sum`], [`monotonic_ns`].
//! - Why a load failed, in one line: [`LoadError`], classified from
//!   libbpf's errno, the verifier's log ([`verifier`]: libbpf's messages
//!   are captured, not printed) and the machine's facts ([`Host`]):
//!   `verifier rejected sys_exit on 6.18.44: program too complex (E2BIG,
//!   1000001 insns processed)`.
//! - What a load cost: [`verified_insns`], [`LoadClock`], [`LoadReport`]
//!   (for `leakscope doctor` and the verifier budget test).
//! - Ring-buffer records: [`Pod`], [`read`], [`cstr`].
//!
//! It does not: know any program's maps or records.
#![deny(missing_docs)]

use std::io;

use libbpf_rs::{Link, MapCore, MapFlags, Object};

mod host;
mod load;
pub mod verifier;

pub use host::{Host, VMLINUX_BTF};
pub use load::{verified_insns, LoadClock, LoadReport, ProgramLoad};

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

/// Captures libbpf's own multi-line logging instead of printing it
/// (errors come back as values and are reported in one line; with
/// `LEAKSCOPE_DEBUG` its warnings are printed in full as well), and forgets
/// what earlier loads logged. Call it before opening an object.
pub fn quiet_libbpf() {
    verifier::start_capture();
}

/// Asks the kernel for the verifier's statistics (and, with
/// `LEAKSCOPE_DEBUG`, its full trace) for every program of `object`:
/// they name a rejected program's reason and each program's cost, and a
/// rejected program is then verified once, not twice. Call it between
/// opening and loading.
pub fn request_verifier_log(object: &mut libbpf_rs::OpenObject) {
    let level = verifier::kernel_log_level();
    for mut prog in object.progs_mut() {
        prog.set_log_level(level);
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

/// The errno behind a libbpf error, if it carries one.
pub fn errno(e: &libbpf_rs::Error) -> Option<i32> {
    // libbpf-rs keeps the io::Error inside; its text ends with
    // "(os error N)", and context layers keep that text.
    let text = format!("{e:#}");
    let at = text.rfind("(os error ")? + "(os error ".len();
    text[at..].split(')').next()?.parse().ok()
}

/// Whether libbpf failed because the kernel refused us: EPERM, or EACCES
/// without root (as root, EACCES is the verifier rejecting a program).
pub fn is_permission(e: &libbpf_rs::Error) -> bool {
    match errno(e) {
        Some(libc::EPERM) => true,
        // SAFETY: geteuid has no preconditions.
        Some(libc::EACCES) => (unsafe { libc::geteuid() }) != 0,
        Some(_) => false,
        None => e.to_string().contains("Operation not permitted"),
    }
}

/// Why leakscope's eBPF programs could not be loaded or attached, in one
/// line with the kernel's own reason; the crates that own a program wrap
/// it in their own error. The CLI adds which backend still works.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// The kernel refused: no privileges, or EPERM despite them (lockdown,
    /// a container, RLIMIT_MEMLOCK, ...); the message says which.
    #[error("{reason}")]
    Permission {
        /// What was refused and why, as far as this machine tells.
        reason: String,
    },
    /// The verifier rejected a program.
    #[error("verifier rejected {program} on {release}: {reason}")]
    Verifier {
        /// The program (its C function).
        program: String,
        /// `uname -r`.
        release: String,
        /// The verifier's final error line, or what it means
        /// (`program too complex (E2BIG, 1000001 insns processed)`).
        reason: String,
    },
    /// The kernel lacks something the programs need.
    #[error("kernel {release} lacks {feature}")]
    MissingFeature {
        /// What is missing (`BTF type information (...)`, `the BPF helper
        /// bpf_loop`, ...).
        feature: String,
        /// `uname -r`.
        release: String,
    },
    /// tracefs is missing and could not be mounted.
    #[error(
        "tracefs is not mounted and mounting it at /sys/kernel/tracing failed ({}); \
         mount it there with `mount -t tracefs tracefs /sys/kernel/tracing`",
        .0.raw_os_error().map_or_else(|| .0.to_string(), errno_name)
    )]
    Tracefs(io::Error),
    /// libbpf failed for another reason.
    #[error("eBPF {what} failed: {detail}")]
    Bpf {
        /// Which step.
        what: &'static str,
        /// What libbpf said (its last warning, or its error).
        detail: String,
    },
}

impl LoadError {
    /// Classifies a libbpf failure at step `what`, from its errno, what
    /// libbpf and the verifier logged since [`quiet_libbpf`], and this
    /// machine's facts.
    pub fn libbpf(what: &'static str, source: libbpf_rs::Error) -> LoadError {
        let failed = verifier::program_logs()
            .into_iter()
            .rev()
            .find(|l| l.error.is_some());
        classify(
            what,
            &source,
            failed.as_ref(),
            &verifier::warnings(),
            &Host::current(),
            &probe_feature,
        )
    }
}

/// Kernel features whose absence explains a failed load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Feature {
    /// `BPF_PROG_TYPE_TRACING` (`tp_btf`, Linux 5.5).
    Tracing,
    /// `BPF_MAP_TYPE_RINGBUF` (Linux 5.8).
    RingBuf,
}

/// Asks the kernel whether it has `f`; None if it cannot tell (no
/// privileges to probe).
fn probe_feature(f: Feature) -> Option<bool> {
    use libbpf_rs::libbpf_sys as sys;
    // SAFETY: plain probes; a null opts pointer is allowed.
    let rc = unsafe {
        match f {
            Feature::Tracing => {
                sys::libbpf_probe_bpf_prog_type(sys::BPF_PROG_TYPE_TRACING, std::ptr::null())
            }
            Feature::RingBuf => {
                sys::libbpf_probe_bpf_map_type(sys::BPF_MAP_TYPE_RINGBUF, std::ptr::null())
            }
        }
    };
    match rc {
        1 => Some(true),
        0 => Some(false),
        _ => None,
    }
}

fn errno_name(n: i32) -> String {
    match n {
        libc::EPERM => "EPERM".into(),
        libc::EACCES => "EACCES".into(),
        libc::EINVAL => "EINVAL".into(),
        libc::E2BIG => "E2BIG".into(),
        libc::ENOENT => "ENOENT".into(),
        libc::ESRCH => "ESRCH".into(),
        libc::ENOMEM => "ENOMEM".into(),
        libc::ENOSPC => "ENOSPC".into(),
        libc::EOPNOTSUPP => "EOPNOTSUPP".into(),
        n => format!("errno {n}"),
    }
}

/// The one-line error for a libbpf failure; see [`LoadError::libbpf`].
fn classify(
    what: &'static str,
    source: &libbpf_rs::Error,
    failed: Option<&verifier::ProgramLog>,
    warnings: &[String],
    host: &Host,
    probe: &dyn Fn(Feature) -> Option<bool>,
) -> LoadError {
    let errno = errno(source);
    let release = host.release.clone();
    let confidential = host.lockdown.as_deref() == Some("confidentiality");
    let missing = |feature: String| LoadError::MissingFeature {
        feature,
        release: release.clone(),
    };
    // The verifier ran and said no: its last line is the reason.
    if let Some(log) = failed {
        let error = log.error.as_deref().unwrap_or("");
        if let Some(f) = verifier::unknown_function(error) {
            let why = if confidential {
                " (kernel lockdown 'confidentiality' withholds helpers that read kernel memory)"
            } else {
                ""
            };
            return missing(format!("{f}, which {} calls{why}", log.name));
        }
        return LoadError::Verifier {
            program: log.name.clone(),
            release,
            reason: verifier::describe(error),
        };
    }
    let warned = |needle: &str| warnings.iter().rev().find(|w| w.contains(needle));
    if matches!(errno, Some(libc::EPERM) | Some(libc::EACCES)) && !host.may_load_bpf() {
        let said = errno_name(errno.unwrap_or(libc::EPERM));
        let reason = if host.euid == 0 {
            format!(
                "loading eBPF programs needs CAP_BPF+CAP_PERFMON or CAP_SYS_ADMIN, which \
                 this root process lacks: a container or a reduced capability bounding \
                 set ({said} at {what})"
            )
        } else {
            format!(
                "loading eBPF programs needs root or CAP_BPF+CAP_PERFMON, which euid {} \
                 lacks ({said} at {what})",
                host.euid
            )
        };
        return LoadError::Permission { reason };
    }
    if errno == Some(libc::EPERM) {
        // Privileged, and still EPERM: say what this machine shows.
        let why = if confidential {
            "kernel lockdown is in 'confidentiality' mode".to_string()
        } else if let Some(w) = warned("try raising 'ulimit -l'") {
            w.clone()
        } else {
            let lockdown = match host.lockdown.as_deref() {
                Some(mode) => format!("lockdown is '{mode}'"),
                None => "lockdown unknown".to_string(),
            };
            format!(
                "cause not visible from here ({lockdown}; a seccomp filter or an \
                 LSM policy such as SELinux can do this)"
            )
        };
        let who = if host.euid == 0 {
            "root"
        } else {
            "CAP_BPF+CAP_PERFMON"
        };
        return LoadError::Permission {
            reason: format!("the kernel refused eBPF {what} with EPERM despite {who}: {why}"),
        };
    }
    // libbpf found something missing before the kernel saw a program.
    if !host.btf || warned("Error loading vmlinux BTF").is_some() {
        return missing(format!(
            "BTF type information ({} is absent: a kernel built without \
             CONFIG_DEBUG_INFO_BTF)",
            host::VMLINUX_BTF
        ));
    }
    if let Some(f) = warned("not found in kernel or module BTFs")
        .and_then(|w| w.find("extern (func ksym)").map(|at| &w[at..]))
        .and_then(verifier::unknown_function)
    {
        return missing(f);
    }
    if let Some(w) = warned("failed to find kernel BTF type ID of '") {
        let at = w.find("of '").map_or(0, |i| i + 4);
        let target = w[at..].split('\'').next().unwrap_or("?");
        return missing(format!(
            "the tracepoint {target} in its BTF (tp_btf/{target})"
        ));
    }
    if matches!(what, "open" | "load" | "attach") {
        if probe(Feature::Tracing) == Some(false) {
            return missing("BTF-enabled tracepoints (tp_btf, Linux 5.5)".into());
        }
        if probe(Feature::RingBuf) == Some(false) {
            return missing("the BPF ring buffer (Linux 5.8)".into());
        }
    }
    let said = match errno {
        Some(n) => errno_name(n),
        None => source.to_string(),
    };
    let detail = match warnings.last() {
        Some(w) => format!("{said}; libbpf: {w}"),
        None => said,
    };
    LoadError::Bpf { what, detail }
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

#[cfg(test)]
mod tests {
    use super::*;
    use verifier::tests::{captured, E2BIG, UNRELEASED};

    fn root(release: &str) -> Host {
        Host {
            release: release.into(),
            euid: 0,
            cap_bpf: true,
            cap_perfmon: true,
            cap_sys_admin: true,
            btf: true,
            lockdown: Some("none".into()),
            ..Host::default()
        }
    }

    fn os_error(n: i32) -> libbpf_rs::Error {
        io::Error::from_raw_os_error(n).into()
    }

    /// The one-line message for a failed load after libbpf printed
    /// `messages`, on `host`; the kernel probes say nothing.
    fn message(
        what: &'static str,
        errno: i32,
        messages: &[(libbpf_rs::PrintLevel, &str)],
        host: &Host,
    ) -> String {
        let (programs, warnings) = captured(messages);
        let failed = programs.iter().rev().find(|l| l.error.is_some());
        classify(what, &os_error(errno), failed, &warnings, host, &|_| None).to_string()
    }

    #[test]
    fn errno_survives_libbpf_rs() {
        assert_eq!(errno(&os_error(libc::E2BIG)), Some(libc::E2BIG));
        assert_eq!(errno(&os_error(libc::EPERM)), Some(libc::EPERM));
    }

    #[test]
    fn verifier_rejections_name_program_release_and_reason() {
        assert_eq!(
            message("load", libc::E2BIG, E2BIG, &root("6.18.44")),
            "verifier rejected sys_exit on 6.18.44: program too complex (E2BIG, \
             1000001 insns processed)"
        );
        // 6.1 says EACCES or EINVAL; as root that is the verifier, never
        // a permission problem.
        for errno in [libc::EINVAL, libc::EACCES] {
            assert_eq!(
                message("load", errno, UNRELEASED, &root("6.1.0-x")),
                "verifier rejected sys_exit on 6.1.0-x: Unreleased reference id=5 \
                 alloc_insn=4286"
            );
        }
    }

    #[test]
    fn permission_only_when_the_kernel_refused() {
        let nobody = Host {
            euid: 65534,
            cap_bpf: false,
            cap_perfmon: false,
            cap_sys_admin: false,
            ..root("6.18.44")
        };
        let warned = [(
            libbpf_rs::PrintLevel::Warn,
            "libbpf: map 'traced': failed to create: -EPERM\n",
        )];
        assert_eq!(
            message("load", libc::EPERM, &warned, &nobody),
            "loading eBPF programs needs root or CAP_BPF+CAP_PERFMON, which euid 65534 \
             lacks (EPERM at load)"
        );
        // Root and EACCES without a verifier log: not a permission problem.
        let m = message("load", libc::EACCES, &[], &root("6.18.44"));
        assert_eq!(m, "eBPF load failed: EACCES");
        // Root and EPERM: the kernel really refused; say what is known.
        let locked = Host {
            lockdown: Some("confidentiality".into()),
            ..root("6.18.44")
        };
        assert_eq!(
            message("load", libc::EPERM, &[], &locked),
            "the kernel refused eBPF load with EPERM despite root: kernel lockdown \
             is in 'confidentiality' mode"
        );
        let m = message("load", libc::EPERM, &[], &root("6.18.44"));
        assert!(
            m.starts_with("the kernel refused eBPF load with EPERM despite root: cause"),
            "{m}"
        );
        // Root in a container without the capabilities.
        let capless = Host {
            cap_bpf: false,
            cap_sys_admin: false,
            ..root("6.18.44")
        };
        let m = message("load", libc::EPERM, &[], &capless);
        assert_eq!(
            m,
            "loading eBPF programs needs CAP_BPF+CAP_PERFMON or CAP_SYS_ADMIN, which this \
             root process lacks: a container or a reduced capability bounding set (EPERM \
             at load)"
        );
        let e = LoadError::Tracefs(io::Error::from_raw_os_error(libc::EPERM));
        assert_eq!(
            e.to_string(),
            "tracefs is not mounted and mounting it at /sys/kernel/tracing failed (EPERM); \
             mount it there with `mount -t tracefs tracefs /sys/kernel/tracing`"
        );
    }

    #[test]
    fn missing_features_are_named() {
        let no_btf = Host {
            btf: false,
            ..root("5.4.0")
        };
        let warned = [(
            libbpf_rs::PrintLevel::Warn,
            "libbpf: Error loading vmlinux BTF: -ESRCH\n",
        )];
        assert_eq!(
            message("load", libc::ESRCH, &warned, &no_btf),
            "kernel 5.4.0 lacks BTF type information (/sys/kernel/btf/vmlinux is \
             absent: a kernel built without CONFIG_DEBUG_INFO_BTF)"
        );
        let helper = [(
            libbpf_rs::PrintLevel::Warn,
            "libbpf: prog 'sys_exit': -- BEGIN PROG LOAD LOG --\n\
             12: (85) call bpf_loop#181\n\
             unknown func bpf_loop#181\n\
             processed 40 insns (limit 1000000) max_states_per_insn 0\n\
             -- END PROG LOAD LOG --\n",
        )];
        assert_eq!(
            message("load", libc::EINVAL, &helper, &root("5.15.0")),
            "kernel 5.15.0 lacks the BPF helper bpf_loop, which sys_exit calls"
        );
        let kfunc = [(
            libbpf_rs::PrintLevel::Warn,
            "libbpf: extern (func ksym) 'bpf_rcu_read_lock': not found in kernel or \
             module BTFs\n",
        )];
        assert_eq!(
            message("load", libc::ESRCH, &kfunc, &root("6.1.0")),
            "kernel 6.1.0 lacks the kfunc bpf_rcu_read_lock"
        );
        let tp = [(
            libbpf_rs::PrintLevel::Warn,
            "libbpf: prog 'on_tcp_state': failed to find kernel BTF type ID of \
             'inet_sock_set_state': -ESRCH\n",
        )];
        assert_eq!(
            message("load", libc::ESRCH, &tp, &root("5.10.0")),
            "kernel 5.10.0 lacks the tracepoint inet_sock_set_state in its BTF \
             (tp_btf/inet_sock_set_state)"
        );
        let (_, warnings) = captured(&[]);
        let no_ringbuf = classify(
            "load",
            &os_error(libc::EINVAL),
            None,
            &warnings,
            &root("5.4.0"),
            &|f| Some(f != Feature::RingBuf),
        );
        assert_eq!(
            no_ringbuf.to_string(),
            "kernel 5.4.0 lacks the BPF ring buffer (Linux 5.8)"
        );
    }

    #[test]
    fn other_failures_keep_libbpf_s_last_word() {
        let warned = [(
            libbpf_rs::PrintLevel::Warn,
            "libbpf: prog 'on_exec': failed to attach to tracepoint 'sched/sched_process_exec'\n",
        )];
        assert_eq!(
            message("attach", libc::ENOENT, &warned, &root("6.18.44")),
            "eBPF attach failed: ENOENT; libbpf: prog 'on_exec': failed to attach to \
             tracepoint 'sched/sched_process_exec'"
        );
    }
}
