//! Symbolizes file offsets of a small C program built with debug info.

use std::path::{Path, PathBuf};
use std::process::Command;

use leakscope_event::{AbsAddr, FileOffset};
use leakscope_stacks::{ModuleRef, RawFrame};
use leakscope_symbolize::Symbolizer;
use object::{Object, ObjectSegment};

struct Fixture {
    bin: PathBuf,
    /// File offset of `known_function` and its size in bytes.
    offset: u64,
    size: u64,
}

fn build(name: &str) -> Fixture {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/known.c");
    let bin = dir.join("known");
    let ok = Command::new("cc")
        .args(["-O2", "-g", "-o"])
        .arg(&bin)
        .arg(&src)
        .status()
        .expect("run cc (a C compiler is needed for this test)")
        .success();
    assert!(ok, "cc failed on {}", src.display());

    let nm = Command::new("nm")
        .args(["-S", "--defined-only"])
        .arg(&bin)
        .output()
        .expect("run nm");
    let nm = String::from_utf8(nm.stdout).unwrap();
    let (vaddr, size) = nm
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 4 && f[3] == "known_function").then(|| {
                (
                    u64::from_str_radix(f[0], 16).unwrap(),
                    u64::from_str_radix(f[1], 16).unwrap(),
                )
            })
        })
        .unwrap_or_else(|| panic!("known_function not in nm output:\n{nm}"));

    let data = std::fs::read(&bin).unwrap();
    let obj = object::File::parse(&*data).unwrap();
    let offset = obj
        .segments()
        .find_map(|s| {
            let (off, len) = s.file_range();
            (s.address() <= vaddr && vaddr < s.address() + len).then(|| off + vaddr - s.address())
        })
        .expect("known_function in a PT_LOAD segment");
    Fixture { bin, offset, size }
}

fn frame(fx: &Fixture, offset: u64, ret: bool, build_id: Option<&str>) -> RawFrame {
    RawFrame {
        addr: AbsAddr(0x5555_0000_0000 + offset),
        is_return_address: ret,
        module: Some(ModuleRef {
            path: fx.bin.to_str().unwrap().to_owned(),
            build_id: build_id.map(str::to_owned),
            offset: FileOffset(offset),
        }),
    }
}

#[test]
fn symbolizes_known_function_by_file_offset() {
    let fx = build("symbolize-known");
    let mut s = Symbolizer::new();
    let frames = [
        frame(&fx, fx.offset, false, None),
        // A return address one past the start looks up the start.
        frame(&fx, fx.offset + 1, true, None),
    ];
    let out = s.symbolize(&frames);
    assert_eq!(out.len(), 2, "{out:#?}");
    for (f, raw) in out.iter().zip(&frames) {
        assert_eq!(f.function.as_deref(), Some("known_function"), "{f:?}");
        assert!(!f.inlined);
        assert_eq!(f.addr, raw.addr);
        assert_eq!(f.module.as_deref(), fx.bin.to_str());
        assert!(f.file.as_deref().unwrap().ends_with("known.c"), "{f:?}");
        // The first instruction belongs to line 10 or, at -O2, 11.
        assert!(f.line.is_some_and(|l| (10..=11).contains(&l)), "{f:?}");
    }
    // Cached results are the same.
    assert_eq!(s.symbolize(&frames), out);
}

#[test]
fn inlined_callee_comes_first() {
    let fx = build("symbolize-inlined");
    let mut s = Symbolizer::new();
    let frames: Vec<RawFrame> = (0..fx.size)
        .map(|i| frame(&fx, fx.offset + i, false, None))
        .collect();
    let out = s.symbolize(&frames);
    let pair = out
        .windows(2)
        .find(|w| w[0].function.as_deref() == Some("inlined_helper"))
        .unwrap_or_else(|| panic!("no inlined frame in {out:#?}"));
    assert!(pair[0].inlined);
    assert_eq!(pair[0].addr, pair[1].addr);
    assert_eq!(pair[1].function.as_deref(), Some("known_function"));
    assert!(!pair[1].inlined);
    assert!(
        pair[0].line.is_some_and(|l| (5..=7).contains(&l)),
        "{:?}",
        pair[0]
    );
    assert_eq!(pair[1].line, Some(12), "call site of inlined_helper");
}

#[test]
fn unknown_offsets_and_wrong_build_id_give_no_name() {
    let fx = build("symbolize-unknown");
    let mut s = Symbolizer::new();
    let missing = RawFrame {
        addr: AbsAddr(0x1234),
        is_return_address: false,
        module: Some(ModuleRef {
            path: "/nonexistent/lib.so".into(),
            build_id: Some("00ff".into()),
            offset: FileOffset(0x1234),
        }),
    };
    let out = s.symbolize(&[
        frame(&fx, fx.offset, false, Some("0123456789abcdef")),
        frame(&fx, 0x7fff_0000, false, None),
        missing,
    ]);
    assert_eq!(out.len(), 3, "{out:#?}");
    for f in &out {
        assert_eq!(f.function, None, "{f:?}");
        assert!(f.module.is_some());
    }
}
