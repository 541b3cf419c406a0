//! The clock page (see `leakscope_event::wire::CLOCK_FILE`): a shared page
//! holding `CLOCK_MONOTONIC_COARSE`, which a thread of the collector
//! refreshes every millisecond. The shims read the time of each allocation
//! from it with one load; a `clock_gettime` call per allocation cost about
//! as much as the rest of recording it.
//!
//! The page lags the clock by at most one tick plus scheduling delay, and
//! stops when the collector does (the shims then stop recording anyway).

use std::fs::OpenOptions;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use leakscope_event::wire::{CLOCK_LEN, CLOCK_MAGIC, CLOCK_NOW, CLOCK_TICK_NS};

/// The mapped page and the thread that keeps it current; both end on drop.
pub(crate) struct ClockPage {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// The writable mapping, owned by the refreshing thread (unmapped when it
/// ends).
struct Map(*mut u8);

// SAFETY: the mapping is plain shared memory, written only through atomics.
unsafe impl Send for Map {}

impl Map {
    fn word(&self, offset: usize) -> &AtomicU64 {
        // SAFETY: offsets are 8-aligned and inside the page, which stays
        // mapped as long as `self`.
        unsafe { AtomicU64::from_ptr(self.0.add(offset) as *mut u64) }
    }
}

impl Drop for Map {
    fn drop(&mut self) {
        // SAFETY: our own mapping of CLOCK_LEN bytes.
        unsafe { libc::munmap(self.0 as *mut libc::c_void, CLOCK_LEN) };
    }
}

fn coarse_ns() -> u64 {
    crate::clock_ns(libc::CLOCK_MONOTONIC_COARSE)
}

impl ClockPage {
    /// Creates the page at `path` (readable by its owner only, like the
    /// directory it is in) and starts refreshing it.
    pub(crate) fn create(path: &Path) -> io::Result<ClockPage> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)?;
        file.set_len(CLOCK_LEN as u64)?;
        // SAFETY: a fresh shared mapping of the whole file; the file may be
        // closed afterwards (the mapping keeps it).
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                CLOCK_LEN,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let map = Map(p as *mut u8);
        map.word(CLOCK_NOW).store(coarse_ns(), Ordering::Relaxed);
        map.word(0).store(CLOCK_MAGIC, Ordering::Release);
        let stop = Arc::new(AtomicBool::new(false));
        let s = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("leakscope-clock".into())
            .spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    map.word(CLOCK_NOW).store(coarse_ns(), Ordering::Relaxed);
                    std::thread::sleep(Duration::from_nanos(CLOCK_TICK_NS));
                }
            })?;
        Ok(ClockPage {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for ClockPage {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_follows_the_coarse_clock() {
        let dir = std::env::temp_dir().join(format!("leakscope-clock-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("clock");
        let page = ClockPage::create(&path).unwrap();
        std::thread::sleep(Duration::from_millis(30));
        let bytes = std::fs::read(&path).unwrap();
        let word = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().unwrap());
        let lag = coarse_ns().saturating_sub(word(CLOCK_NOW));
        // One tick plus a coarse-clock tick (4 ms at HZ=250), with room
        // for a descheduled refresher on a busy machine.
        assert!(lag < 50_000_000, "page lags the clock by {lag} ns");
        assert_eq!(bytes.len(), CLOCK_LEN);
        assert_eq!(word(0), CLOCK_MAGIC);
        drop(page);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
