//! Signals while a traced command runs: leakscope must outlive it to report.
//!
//! SIGINT and SIGQUIT from a terminal reach the whole foreground process
//! group, so the command gets them itself; leakscope only notes them.
//! SIGTERM and SIGHUP sent to leakscope alone are forwarded to the command.
//! Handlers (not SIG_IGN) are used because ignored signals would stay
//! ignored in the command across execve(2).

use std::sync::atomic::{AtomicI32, Ordering};

static PENDING: AtomicI32 = AtomicI32::new(0);

extern "C" fn note(sig: libc::c_int) {
    PENDING.store(sig, Ordering::SeqCst);
}

/// Installs the handlers.
pub fn install() {
    for sig in [libc::SIGINT, libc::SIGQUIT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: `note` only stores to an atomic, which is async-signal-safe.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = note as *const () as usize;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

/// Takes the last signal received, if any.
pub fn take() -> Option<i32> {
    match PENDING.swap(0, Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// Whether a signal should be passed on to the traced command.
pub fn forwarded(sig: i32) -> bool {
    sig == libc::SIGTERM || sig == libc::SIGHUP
}

/// Ends leakscope by `sig`, so the shell sees what the command got.
pub fn die_by(sig: i32) {
    // SAFETY: resetting a handler and raising a signal on ourselves.
    unsafe {
        libc::signal(sig, libc::SIG_DFL);
        libc::raise(sig);
    }
}
