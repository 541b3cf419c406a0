//! The recording reader against damaged input: thousands of deterministic
//! mutations of a real recording (bits flipped, bytes set, cut, inserted,
//! deleted, lengths made huge), half of them with their chunks' checksums
//! recomputed so that the damage reaches the record decoder. Each must be
//! read or refused, never panic or allocate beyond the input's size; the
//! first readable ones are also reported by the binary, which must exit 0
//! or 5, never crash. A fixed number of inputs, so the suite's time stays
//! fixed; `LEAKSCOPE_FUZZ_ITERATIONS` runs more.

use std::path::Path;
use std::process::Command;

use leakscope_testutil::workspace_root;

const BIN: &str = env!("CARGO_BIN_EXE_leakscope");

/// xorshift64*: deterministic, so a failure is reproduced by its number.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

/// A real recording: drip's leaks over several commits, with removals
/// (balanced blocks caught between malloc and free) and growth records.
fn real_recording(dir: &Path) -> Vec<u8> {
    leakscope_testutil::ensure_shim(Path::new(BIN));
    let bin = dir.join("drip");
    let st = Command::new("cc")
        .args(["-g", "-O2", "-o"])
        .arg(&bin)
        .arg(workspace_root().join("fixtures/heap/drip.c"))
        .status()
        .unwrap();
    assert!(st.success());
    let rec = dir.join("base.lsr");
    let o = Command::new(BIN)
        .args(["record", "-o"])
        .arg(&rec)
        .args([
            "--commit-every",
            "0.05",
            "--backend",
            "preload",
            "--track",
            "heap",
            "--",
        ])
        .arg(&bin)
        .args(["300", "50"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    std::fs::read(&rec).unwrap()
}

/// Recomputes the checksum of every chunk whose length field still fits.
fn fix_checksums(b: &mut [u8]) {
    let mut pos = 16;
    while pos + 8 <= b.len() {
        let len = u32::from_le_bytes(b[pos..pos + 4].try_into().unwrap()) as usize;
        if len == 0 || pos + 8 + len > b.len() {
            return;
        }
        let crc = crc32fast::hash(&b[pos + 8..pos + 8 + len]);
        b[pos + 4..pos + 8].copy_from_slice(&crc.to_le_bytes());
        pos += 8 + len;
    }
}

fn mutate(base: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut b = base.to_vec();
    for _ in 0..1 + rng.below(3) {
        let n = b.len();
        match rng.below(7) {
            0 => {
                let i = rng.below(n);
                if n > 0 {
                    b[i] ^= 1 << rng.below(8);
                }
            }
            1 => {
                let i = rng.below(n);
                if n > 0 {
                    b[i] = rng.next() as u8;
                }
            }
            2 => b.truncate(rng.below(n + 1)),
            3 => {
                let at = rng.below(n + 1);
                let k = 1 + rng.below(16);
                let junk: Vec<u8> = (0..k).map(|_| rng.next() as u8).collect();
                b.splice(at..at, junk);
            }
            4 => {
                let at = rng.below(n + 1);
                let end = (at + 1 + rng.below(32)).min(n);
                b.drain(at..end);
            }
            5 => {
                // A length or count made huge.
                let at = rng.below(n.saturating_sub(4) + 1);
                if at + 4 <= n {
                    b[at..at + 4].copy_from_slice(&[0xff, 0xff, 0xff, 0x7f]);
                }
            }
            _ => {
                let at = rng.below(n + 1);
                let end = (at + 1 + rng.below(64)).min(n);
                let copy = b[at..end].to_vec();
                let to = rng.below(b.len() + 1);
                b.splice(to..to, copy);
            }
        }
    }
    if rng.below(2) == 0 {
        fix_checksums(&mut b);
    }
    b
}

#[test]
fn mutated_recordings_are_read_or_refused_never_a_crash() {
    let dir = std::env::temp_dir().join(format!("leakscope-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let base = real_recording(&dir);
    assert!(leakscope_record::read(&base).is_ok());
    let iterations: u64 = std::env::var("LEAKSCOPE_FUZZ_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5000);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let (mut read, mut refused, mut reported) = (0u64, 0u64, 0u64);
    let mut refusals = std::collections::BTreeSet::new();
    for i in 0..iterations {
        let input = mutate(&base, &mut rng);
        match leakscope_record::read(&input) {
            Ok(_) => read += 1,
            Err(e) => {
                refused += 1;
                let s = e.to_string();
                assert_eq!(s.lines().count(), 1, "input {i}: {s}");
                refusals.insert(s.split(':').next().unwrap().to_string());
            }
        }
        // The binary on a few of each: a report or exit status 5.
        if reported < 40 && i % 25 == 0 {
            reported += 1;
            let f = dir.join("mutated.lsr");
            std::fs::write(&f, &input).unwrap();
            let o = Command::new(BIN)
                .args(["report", "--format", "json", "-o", "/dev/null"])
                .arg(&f)
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(
                matches!(o.status.code(), Some(0) | Some(5)),
                "input {i}: {:?} {err}",
                o.status
            );
            assert!(!err.contains("panicked"), "input {i}: {err}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    // Both outcomes were exercised, and refusals of several kinds.
    assert!(read > 0 && refused > 0, "read {read}, refused {refused}");
    assert!(refusals.len() >= 3, "{refusals:?}");
}
