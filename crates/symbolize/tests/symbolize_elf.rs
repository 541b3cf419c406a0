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
fn unknown_offsets_and_wrong_build_id_give_only_a_place() {
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
    let names: Vec<Option<&str>> = out.iter().map(|f| f.function.as_deref()).collect();
    // No ELF address can be given for a file that is not the one mapped,
    // nor for an offset outside its segments, nor for a missing file.
    let rebuilt = format!("known+{:#x} (file offset)", fx.offset);
    assert_eq!(
        names,
        [
            Some(rebuilt.as_str()),
            Some("known+0x7fff0000 (file offset)"),
            Some("lib.so+0x1234 (file offset)"),
        ],
        "{out:#?}"
    );
    for f in &out {
        assert!(f.module.is_some() && f.file.is_none() && f.line.is_none());
    }
}

/// Runs a binutils tool (`strip`, `objcopy`, `nm`) and returns stdout.
fn tool(cmd: &str, args: &[&std::ffi::OsStr]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd} (binutils): {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A copy of the fixture's binary at `dir/name`.
fn copy_to(fx: &Fixture, dir: &Path, name: &str) -> Fixture {
    std::fs::create_dir_all(dir).unwrap();
    let bin = dir.join(name);
    std::fs::copy(&fx.bin, &bin).unwrap();
    Fixture {
        bin,
        offset: fx.offset,
        size: fx.size,
    }
}

/// `nm`'s address of `known_function` in the unstripped build.
fn nm_vaddr(fx: &Fixture) -> u64 {
    tool("nm", &[fx.bin.as_os_str()])
        .lines()
        .find_map(|l| l.strip_suffix(" T known_function"))
        .map(|a| u64::from_str_radix(a, 16).unwrap())
        .expect("known_function in nm's output")
}

#[test]
fn stripped_binaries_use_what_is_left_and_separate_debug_files() {
    let fx = build("symbolize-stripped");
    let vaddr = nm_vaddr(&fx);
    let dir = fx.bin.parent().unwrap().to_path_buf();
    let name_of = |s: &mut Symbolizer, f: &Fixture| {
        let out = s.symbolize(&[frame(f, f.offset, false, None)]);
        let last = out.last().unwrap().clone();
        (last.function.unwrap(), last.line)
    };

    // --strip-debug keeps .symtab: the name, no line.
    let sd = copy_to(&fx, &dir.join("strip-debug"), "known");
    tool("strip", &["--strip-debug".as_ref(), sd.bin.as_os_str()]);
    assert_eq!(
        name_of(&mut Symbolizer::new(), &sd),
        ("known_function".into(), None)
    );

    // --strip-all: no symbol at all, so the module and the address nm gave
    // the function in the unstripped file.
    let sa = copy_to(&fx, &dir.join("strip-all"), "known");
    tool("strip", &["--strip-all".as_ref(), sa.bin.as_os_str()]);
    assert_eq!(
        name_of(&mut Symbolizer::new(), &sa),
        (format!("known+{vaddr:#x}"), None)
    );

    // --strip-all with the debug info in a file named by .gnu_debuglink.
    let dl = copy_to(&fx, &dir.join("debuglink"), "known");
    let debug = dl.bin.with_extension("debug");
    tool(
        "objcopy",
        &[
            "--only-keep-debug".as_ref(),
            fx.bin.as_os_str(),
            debug.as_os_str(),
        ],
    );
    tool("strip", &["--strip-all".as_ref(), dl.bin.as_os_str()]);
    let link = format!("--add-gnu-debuglink={}", debug.display());
    tool("objcopy", &[link.as_ref(), dl.bin.as_os_str()]);
    let (name, line) = name_of(&mut Symbolizer::new(), &dl);
    assert_eq!(name, "known_function");
    assert!(line.is_some_and(|l| (10..=11).contains(&l)), "{line:?}");

    // --strip-all, no debug link: found by build id in a debug directory,
    // as Debian's -dbgsym packages install it.
    let bi = copy_to(&fx, &dir.join("build-id/bin"), "known");
    tool("strip", &["--strip-all".as_ref(), bi.bin.as_os_str()]);
    let id = tool("readelf", &["-n".as_ref(), bi.bin.as_os_str()])
        .lines()
        .find_map(|l| l.trim().strip_prefix("Build ID: ").map(str::to_owned))
        .expect("cc gives a build id");
    let debug_dir = dir.join("build-id/debug");
    let target = debug_dir
        .join(".build-id")
        .join(&id[..2])
        .join(format!("{}.debug", &id[2..]));
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    std::fs::copy(&debug, &target).unwrap();
    assert_eq!(
        name_of(&mut Symbolizer::new(), &bi).0,
        format!("known+{vaddr:#x}"),
        "not in the default directories"
    );
    let (name, line) = name_of(
        &mut Symbolizer::with_debug_dirs(vec![debug_dir.clone()]),
        &bi,
    );
    assert_eq!(name, "known_function");
    assert!(line.is_some_and(|l| (10..=11).contains(&l)), "{line:?}");

    // A debug file of another build is not used.
    let other = debug_dir.join("other.debug");
    std::fs::copy(&debug, &other).unwrap();
    tool(
        "objcopy",
        &[
            "--remove-section=.note.gnu.build-id".as_ref(),
            other.as_os_str(),
        ],
    );
    std::fs::rename(&other, &target).unwrap();
    assert_eq!(
        name_of(&mut Symbolizer::with_debug_dirs(vec![debug_dir]), &bi).0,
        format!("known+{vaddr:#x}")
    );
}

/// C functions named like Itanium type codes stay as they are (issue 14).
#[test]
fn one_letter_c_names_are_not_demangled() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("symbolize-one-letter");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join("names.c");
    let names = ["f", "g", "h", "i", "v", "d", "ab"];
    let mut code = String::from("volatile int sink;\n");
    for n in names {
        code += &format!("__attribute__((noinline)) void {n}(void) {{ sink++; }}\n");
    }
    code += "int main(void) {";
    for n in names {
        code += &format!(" {n}();");
    }
    code += " return 0; }\n";
    std::fs::write(&src, code).unwrap();
    let bin = dir.join("names");
    let ok = Command::new("cc")
        .args(["-O2", "-g", "-o"])
        .arg(&bin)
        .arg(&src)
        .status()
        .expect("run cc")
        .success();
    assert!(ok);
    let nm = tool("nm", &[bin.as_os_str()]);
    let data = std::fs::read(&bin).unwrap();
    let obj = object::File::parse(&*data).unwrap();
    let file_offset = |vaddr: u64| {
        obj.segments()
            .find_map(|s| {
                let (off, len) = s.file_range();
                (s.address() <= vaddr && vaddr < s.address() + len)
                    .then(|| off + vaddr - s.address())
            })
            .unwrap()
    };
    let mut s = Symbolizer::new();
    for n in names {
        let vaddr = nm
            .lines()
            .find_map(|l| l.strip_suffix(&format!(" T {n}")))
            .map(|a| u64::from_str_radix(a, 16).unwrap())
            .unwrap_or_else(|| panic!("{n} not in nm's output:\n{nm}"));
        let fx = Fixture {
            bin: bin.clone(),
            offset: file_offset(vaddr),
            size: 1,
        };
        let out = s.symbolize(&[frame(&fx, fx.offset, false, None)]);
        assert_eq!(out[0].function.as_deref(), Some(n), "{out:#?}");
    }
}
