//! Unwinds a real stack copied by a program built without frame pointers,
//! then symbolizes it: leaf, middle, outer and main must appear in order.

use std::path::{Path, PathBuf};
use std::process::Command;

use leakscope_event::{AbsAddr, Event, FileOffset, Mapping, Pid, RawStack, TimeNs};
use leakscope_stacks::{ModuleMaps, Unwinder};
use leakscope_symbolize::Symbolizer;

const PID: Pid = Pid(4242);

fn tmp_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

/// Builds and runs the fixture in its own directory (tests run in
/// parallel); returns that directory and the binary.
fn run_fixture(name: &str) -> (PathBuf, PathBuf) {
    let dir = tmp_dir(name);
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/frames.c");
    let bin = dir.join("frames");
    let status = Command::new("cc")
        .args(["-O2", "-fomit-frame-pointer", "-g", "-o"])
        .arg(&bin)
        .arg(&src)
        .status()
        .expect("run cc (a C compiler is needed for this test)");
    assert!(status.success(), "cc failed on {}", src.display());
    let status = Command::new(&bin).arg(&dir).status().expect("run fixture");
    assert!(status.success(), "fixture failed: {status}");
    (dir, bin)
}

/// `r-xp` file-backed lines of /proc/PID/maps as Map events at time 0.
fn map_events(maps: &str) -> Vec<Event> {
    maps.lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let range = f.next()?;
            let perms = f.next()?;
            let offset = u64::from_str_radix(f.next()?, 16).ok()?;
            let _dev = f.next()?;
            let _inode = f.next()?;
            let path = f.next()?;
            if !perms.contains('x') || !path.starts_with('/') {
                return None;
            }
            let (lo, hi) = range.split_once('-')?;
            Some(Event::Map {
                time: TimeNs(0),
                pid: PID,
                mapping: Mapping {
                    start: AbsAddr(u64::from_str_radix(lo, 16).ok()?),
                    end: AbsAddr(u64::from_str_radix(hi, 16).ok()?),
                    offset: FileOffset(offset),
                    path: path.to_owned(),
                },
            })
        })
        .collect()
}

#[test]
fn unwinds_copied_stack_without_frame_pointers() {
    let (dir, bin) = run_fixture("stacks-frames");
    let read = |name: &str| std::fs::read(dir.join(name)).expect(name);
    let regs = String::from_utf8(read("regs.txt")).unwrap();
    let regs: Vec<u64> = regs
        .split_whitespace()
        .map(|r| u64::from_str_radix(r, 16).unwrap())
        .collect();
    let maps = String::from_utf8(read("maps.txt")).unwrap();

    let mut module_maps = ModuleMaps::new();
    for ev in map_events(&maps) {
        module_maps.apply(&ev);
    }
    let raw = RawStack::Copied {
        ip: regs[0],
        sp: regs[1],
        bp: regs[2],
        bytes: read("stack.bin"),
    };
    let mut unwinder = Unwinder::new();
    let unwound = unwinder.unwind(&module_maps, PID, TimeNs(1), &raw);
    assert!(unwound.frames.len() >= 4, "too few frames: {unwound:#?}");
    let first = unwound.frames[0].module.as_ref().expect("ip has a module");
    assert_eq!(first.path, bin.to_str().unwrap());
    assert!(!unwound.frames[0].is_return_address);
    assert!(unwound.frames[1..].iter().all(|f| f.is_return_address));
    let build_id = first.build_id.as_deref().expect("cc writes a build id");
    assert!(build_id.len() >= 16 && build_id.bytes().all(|b| b.is_ascii_hexdigit()));

    let frames = Symbolizer::new().symbolize(&unwound.frames);
    for f in &frames {
        eprintln!(
            "{:#x} {} {}:{} {} {}",
            f.addr.0,
            f.function.as_deref().unwrap_or("??"),
            f.file.as_deref().unwrap_or("??"),
            f.line.unwrap_or(0),
            f.module.as_deref().unwrap_or("??"),
            if f.inlined { "(inlined)" } else { "" }
        );
    }
    eprintln!("truncated: {:?}", unwound.truncated);
    let names: Vec<&str> = frames
        .iter()
        .filter_map(|f| f.function.as_deref())
        .collect();
    let pos = |name: &str| {
        names
            .iter()
            .position(|n| *n == name)
            .unwrap_or_else(|| panic!("{name} missing from {names:?} ({unwound:#?})"))
    };
    let (leaf, middle, outer, main) = (pos("leaf"), pos("middle"), pos("outer"), pos("main"));
    assert!(
        leaf < middle && middle < outer && outer < main,
        "wrong order: {names:?}"
    );
    let leaf_frame = frames
        .iter()
        .find(|f| f.function.as_deref() == Some("leaf"));
    let leaf_frame = leaf_frame.unwrap();
    assert!(
        leaf_frame
            .file
            .as_deref()
            .is_some_and(|f| f.ends_with("frames.c")),
        "{leaf_frame:?}"
    );
    assert!(leaf_frame.line.is_some());
}

#[test]
fn missing_stack_keeps_reason() {
    let maps = ModuleMaps::new();
    let out = Unwinder::new().unwind(&maps, PID, TimeNs(0), &RawStack::Missing("no copy".into()));
    assert!(out.frames.is_empty());
    assert_eq!(out.truncated.as_deref(), Some("no copy"));
}

#[test]
fn short_copy_is_truncated_with_reason() {
    let (dir, _) = run_fixture("stacks-frames-short");
    let regs = std::fs::read_to_string(dir.join("regs.txt")).unwrap();
    let regs: Vec<u64> = regs
        .split_whitespace()
        .map(|r| u64::from_str_radix(r, 16).unwrap())
        .collect();
    let maps = std::fs::read_to_string(dir.join("maps.txt")).unwrap();
    let mut module_maps = ModuleMaps::new();
    for ev in map_events(&maps) {
        module_maps.apply(&ev);
    }
    let raw = RawStack::Copied {
        ip: regs[0],
        sp: regs[1],
        bp: regs[2],
        bytes: Vec::new(),
    };
    let out = Unwinder::new().unwind(&module_maps, PID, TimeNs(1), &raw);
    assert_eq!(out.frames.len(), 1, "only the ip is known: {out:#?}");
    let reason = out.truncated.expect("truncated");
    assert!(reason.contains("beyond the 0-byte stack copy"), "{reason}");
}
