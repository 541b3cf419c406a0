//! The classic-BPF seccomp filter that makes only fd-lifecycle syscalls
//! stop the tracee (`SECCOMP_RET_TRACE`), as `strace --seccomp-bpf` does,
//! and the table of those syscalls.

use libc::{c_long, sock_filter};

/// Syscalls that acquire or release fds, or map code (mmap with
/// PROT_EXEC, for the module map), by name and number on x86-64. The
/// same list as the eBPF backend's `sys_exit` program decodes.
pub(crate) const TRAPPED: &[(&str, c_long)] = &[
    ("open", libc::SYS_open),
    ("openat", libc::SYS_openat),
    ("openat2", libc::SYS_openat2),
    ("creat", libc::SYS_creat),
    ("open_by_handle_at", libc::SYS_open_by_handle_at),
    ("socket", libc::SYS_socket),
    ("socketpair", libc::SYS_socketpair),
    ("accept", libc::SYS_accept),
    ("accept4", libc::SYS_accept4),
    ("pipe", libc::SYS_pipe),
    ("pipe2", libc::SYS_pipe2),
    ("dup", libc::SYS_dup),
    ("dup2", libc::SYS_dup2),
    ("dup3", libc::SYS_dup3),
    ("fcntl", libc::SYS_fcntl),
    ("eventfd", libc::SYS_eventfd),
    ("eventfd2", libc::SYS_eventfd2),
    ("epoll_create", libc::SYS_epoll_create),
    ("epoll_create1", libc::SYS_epoll_create1),
    ("timerfd_create", libc::SYS_timerfd_create),
    ("signalfd", libc::SYS_signalfd),
    ("signalfd4", libc::SYS_signalfd4),
    ("inotify_init", libc::SYS_inotify_init),
    ("inotify_init1", libc::SYS_inotify_init1),
    ("memfd_create", libc::SYS_memfd_create),
    ("memfd_secret", libc::SYS_memfd_secret),
    ("pidfd_open", libc::SYS_pidfd_open),
    ("pidfd_getfd", libc::SYS_pidfd_getfd),
    ("fanotify_init", libc::SYS_fanotify_init),
    ("userfaultfd", libc::SYS_userfaultfd),
    ("perf_event_open", libc::SYS_perf_event_open),
    ("bpf", libc::SYS_bpf),
    ("close", libc::SYS_close),
    ("close_range", libc::SYS_close_range),
    ("connect", libc::SYS_connect),
    ("mmap", libc::SYS_mmap),
    ("recvmsg", libc::SYS_recvmsg),
    ("recvmmsg", libc::SYS_recvmmsg),
];

/// The name of a trapped syscall.
pub(crate) fn name_of(nr: u64) -> Option<&'static str> {
    TRAPPED
        .iter()
        .find(|(_, n)| *n as u64 == nr)
        .map(|(name, _)| *name)
}

const LD_W_ABS: u16 = 0x20;
const JEQ_K: u16 = 0x15;
const JGE_K: u16 = 0x35;
const JSET_K: u16 = 0x45;
const JA: u16 = 0x05;
const RET_K: u16 = 0x06;
const RET_ALLOW: u32 = 0x7fff_0000;
const RET_TRACE: u32 = 0x7ff0_0000;
const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
const X32_SYSCALL_BIT: u32 = 0x4000_0000;
/// `struct seccomp_data`: nr at 0, arch at 4, args[i] at 16 + 8 i (low
/// half first on little endian).
const OFF_NR: u32 = 0;
const OFF_ARCH: u32 = 4;
const fn off_arg(i: u32) -> u32 {
    16 + 8 * i
}

/// An instruction whose jumps name absolute targets until [`resolve`].
enum Insn {
    Stmt(u16, u32),
    Jump(u16, u32, Target, Target),
    Always(Target),
}

#[derive(Clone, Copy)]
enum Target {
    Next,
    Allow,
    Trace,
    Mmap,
    Fcntl,
}

/// The filter: every trapped syscall returns `SECCOMP_RET_TRACE`, except
/// mmap without PROT_EXEC and fcntl other than F_DUPFD(_CLOEXEC), which
/// say nothing about fds or code; everything else, and every syscall of
/// another ABI (ia32, x32), runs without a stop.
pub(crate) fn program() -> Vec<sock_filter> {
    use Target::*;
    let mut p = vec![
        Insn::Stmt(LD_W_ABS, OFF_ARCH),
        Insn::Jump(JEQ_K, AUDIT_ARCH_X86_64, Next, Allow),
        Insn::Stmt(LD_W_ABS, OFF_NR),
        Insn::Jump(JGE_K, X32_SYSCALL_BIT, Allow, Next),
    ];
    for (name, nr) in TRAPPED {
        let to = match *name {
            "mmap" => Mmap,
            "fcntl" => Fcntl,
            _ => Trace,
        };
        p.push(Insn::Jump(JEQ_K, *nr as u32, to, Next));
    }
    p.push(Insn::Always(Allow));
    let mmap = p.len();
    p.push(Insn::Stmt(LD_W_ABS, off_arg(2)));
    p.push(Insn::Jump(JSET_K, libc::PROT_EXEC as u32, Trace, Allow));
    let fcntl = p.len();
    p.push(Insn::Stmt(LD_W_ABS, off_arg(1)));
    p.push(Insn::Jump(JEQ_K, libc::F_DUPFD as u32, Trace, Next));
    p.push(Insn::Jump(
        JEQ_K,
        libc::F_DUPFD_CLOEXEC as u32,
        Trace,
        Allow,
    ));
    let allow = p.len();
    p.push(Insn::Stmt(RET_K, RET_ALLOW));
    let trace = p.len();
    p.push(Insn::Stmt(RET_K, RET_TRACE));
    resolve(&p, allow, trace, mmap, fcntl)
}

fn resolve(p: &[Insn], allow: usize, trace: usize, mmap: usize, fcntl: usize) -> Vec<sock_filter> {
    let at = |i: usize, t: Target| -> u8 {
        let abs = match t {
            Target::Next => i + 1,
            Target::Allow => allow,
            Target::Trace => trace,
            Target::Mmap => mmap,
            Target::Fcntl => fcntl,
        };
        // Classic BPF jumps only forward, by at most 255.
        u8::try_from(abs - (i + 1)).expect("filter jump within 255")
    };
    p.iter()
        .enumerate()
        .map(|(i, insn)| match *insn {
            Insn::Stmt(code, k) => sock_filter {
                code,
                jt: 0,
                jf: 0,
                k,
            },
            Insn::Jump(code, k, t, f) => sock_filter {
                code,
                jt: at(i, t),
                jf: at(i, f),
                k,
            },
            Insn::Always(t) => sock_filter {
                code: JA,
                jt: 0,
                jf: 0,
                k: u32::from(at(i, t)),
            },
        })
        .collect()
}

/// Installs `prog` in the calling process (between fork and exec: no
/// allocation). seccomp(2): without CAP_SYS_ADMIN a filter needs
/// no_new_privs, which is then set (a set-user-ID program started under
/// it runs without its privileges, as under `strace --seccomp-bpf`).
pub(crate) fn install(prog: &[sock_filter]) -> std::io::Result<()> {
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_ptr() as *mut sock_filter,
    };
    let set = || {
        // SAFETY: fprog points at `prog`, alive for the call.
        unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                0,
                &fprog as *const libc::sock_fprog,
            )
        }
    };
    if set() == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::EACCES) {
        return Err(err);
    }
    // SAFETY: prctl(PR_SET_NO_NEW_PRIVS, 1) has no memory arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if set() == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    /// Without a tracer, a `SECCOMP_RET_TRACE` syscall fails with ENOSYS
    /// (seccomp(2)): a forked child installs the filter and checks which
    /// calls it traps.
    #[test]
    fn traps_fd_syscalls_only() {
        let prog = super::program();
        // SAFETY: the child only makes raw syscalls and _exits.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let code = (|| unsafe {
                if super::install(&prog).is_err() {
                    return 10;
                }
                let errno = || *libc::__errno_location();
                if libc::syscall(libc::SYS_close, 999) != -1 || errno() != libc::ENOSYS {
                    return 11;
                }
                if libc::syscall(libc::SYS_dup, 0) != -1 || errno() != libc::ENOSYS {
                    return 12;
                }
                // fcntl(F_GETFD) and an anonymous non-exec mmap run.
                if libc::syscall(libc::SYS_fcntl, 0, libc::F_GETFD) < 0 {
                    return 13;
                }
                if libc::syscall(libc::SYS_fcntl, 0, libc::F_DUPFD_CLOEXEC, 0) != -1 {
                    return 14;
                }
                let m = libc::syscall(
                    libc::SYS_mmap,
                    0,
                    4096,
                    libc::PROT_READ,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                );
                if m == -1 {
                    return 15;
                }
                let x = libc::syscall(
                    libc::SYS_mmap,
                    0,
                    4096,
                    libc::PROT_READ | libc::PROT_EXEC,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                );
                if x != -1 || errno() != libc::ENOSYS {
                    return 16;
                }
                if libc::syscall(libc::SYS_getpid) <= 0 {
                    return 17;
                }
                0
            })();
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(libc::WIFEXITED(status), "status {status:#x}");
        assert_eq!(libc::WEXITSTATUS(status), 0, "check that failed");
    }
}
