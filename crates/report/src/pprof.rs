//! pprof: `profile.proto` (github.com/google/pprof, proto/profile.proto),
//! gzipped, as `go tool pprof`, Pyroscope and Parca read it. One sample
//! per leak group, valued by its outstanding count and bytes, labelled
//! with its kind and resource; inlined frames are the lines of one
//! location, innermost first, as the format wants.

use std::collections::HashMap;
use std::io::Write;

use prost::Message;

use crate::{Report, StackFrame};

/// The messages of `profile.proto` leakscope writes, field numbers as
/// there.
pub mod proto {
    /// The profile.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Profile {
        /// What each sample value means.
        #[prost(message, repeated, tag = "1")]
        pub sample_type: Vec<ValueType>,
        /// The samples.
        #[prost(message, repeated, tag = "2")]
        pub sample: Vec<Sample>,
        /// Mapped modules.
        #[prost(message, repeated, tag = "3")]
        pub mapping: Vec<Mapping>,
        /// Code locations.
        #[prost(message, repeated, tag = "4")]
        pub location: Vec<Location>,
        /// Functions.
        #[prost(message, repeated, tag = "5")]
        pub function: Vec<Function>,
        /// Strings, referred to by index; the first is "".
        #[prost(string, repeated, tag = "6")]
        pub string_table: Vec<String>,
        /// When the trace began, ns since the epoch.
        #[prost(int64, tag = "9")]
        pub time_nanos: i64,
        /// How long it ran.
        #[prost(int64, tag = "10")]
        pub duration_nanos: i64,
        /// Free-form comments (string indices).
        #[prost(int64, repeated, tag = "13")]
        pub comment: Vec<i64>,
        /// The sample type shown by default (string index of its type).
        #[prost(int64, tag = "14")]
        pub default_sample_type: i64,
    }

    /// A value's type and unit (string indices).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ValueType {
        /// e.g. `leaked_objects`.
        #[prost(int64, tag = "1")]
        pub r#type: i64,
        /// e.g. `count`, `bytes`.
        #[prost(int64, tag = "2")]
        pub unit: i64,
    }

    /// One stack and its values.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Sample {
        /// Location ids, leaf first.
        #[prost(uint64, repeated, tag = "1")]
        pub location_id: Vec<u64>,
        /// One per sample type.
        #[prost(int64, repeated, tag = "2")]
        pub value: Vec<i64>,
        /// Labels.
        #[prost(message, repeated, tag = "3")]
        pub label: Vec<Label>,
    }

    /// A string label (string indices).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Label {
        /// Key.
        #[prost(int64, tag = "1")]
        pub key: i64,
        /// Value.
        #[prost(int64, tag = "2")]
        pub str: i64,
    }

    /// A module.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Mapping {
        /// Id (from 1).
        #[prost(uint64, tag = "1")]
        pub id: u64,
        /// Its path (string index).
        #[prost(int64, tag = "5")]
        pub filename: i64,
        /// Locations carry function names.
        #[prost(bool, tag = "7")]
        pub has_functions: bool,
        /// ... and file names.
        #[prost(bool, tag = "8")]
        pub has_filenames: bool,
        /// ... and line numbers.
        #[prost(bool, tag = "9")]
        pub has_line_numbers: bool,
        /// ... and inlined frames.
        #[prost(bool, tag = "10")]
        pub has_inline_frames: bool,
    }

    /// An address and the source lines it stands for.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Location {
        /// Id (from 1).
        #[prost(uint64, tag = "1")]
        pub id: u64,
        /// Its module, 0 if unknown.
        #[prost(uint64, tag = "2")]
        pub mapping_id: u64,
        /// The address in the traced process.
        #[prost(uint64, tag = "3")]
        pub address: u64,
        /// Innermost (inlined) first.
        #[prost(message, repeated, tag = "4")]
        pub line: Vec<Line>,
    }

    /// A source line.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Line {
        /// Its function.
        #[prost(uint64, tag = "1")]
        pub function_id: u64,
        /// Line number, 0 if unknown.
        #[prost(int64, tag = "2")]
        pub line: i64,
    }

    /// A function.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Function {
        /// Id (from 1).
        #[prost(uint64, tag = "1")]
        pub id: u64,
        /// Name (string index).
        #[prost(int64, tag = "2")]
        pub name: i64,
        /// Its symbol's name (string index).
        #[prost(int64, tag = "3")]
        pub system_name: i64,
        /// Source file (string index).
        #[prost(int64, tag = "4")]
        pub filename: i64,
    }
}

use proto::*;

#[derive(Default)]
struct Builder {
    p: Profile,
    strings: HashMap<String, i64>,
    mappings: HashMap<String, u64>,
    functions: HashMap<(String, String), u64>,
    locations: HashMap<(String, String), u64>,
}

impl Builder {
    fn s(&mut self, s: &str) -> i64 {
        if let Some(i) = self.strings.get(s) {
            return *i;
        }
        let i = self.p.string_table.len() as i64;
        self.p.string_table.push(s.to_string());
        self.strings.insert(s.to_string(), i);
        i
    }

    fn mapping(&mut self, module: &str) -> u64 {
        if let Some(id) = self.mappings.get(module) {
            return *id;
        }
        let id = self.p.mapping.len() as u64 + 1;
        let filename = self.s(module);
        self.p.mapping.push(Mapping {
            id,
            filename,
            has_functions: true,
            has_filenames: true,
            has_line_numbers: true,
            has_inline_frames: true,
        });
        self.mappings.insert(module.to_string(), id);
        id
    }

    fn function(&mut self, f: &StackFrame) -> u64 {
        // A frame without a symbol is named module+0xADDR, as the text
        // report names it.
        let name = match &f.function {
            Some(n) => n.clone(),
            None => format!(
                "{}+{}",
                f.module.as_deref().map_or("?", crate::basename),
                f.addr
            ),
        };
        let file = f.file.clone().unwrap_or_default();
        let key = (name, file);
        if let Some(id) = self.functions.get(&key) {
            return *id;
        }
        let id = self.p.function.len() as u64 + 1;
        let (name, filename) = (self.s(&key.0), self.s(&key.1));
        self.p.function.push(Function {
            id,
            name,
            system_name: name,
            filename,
        });
        self.functions.insert(key, id);
        id
    }

    /// The location of `frames`: one address, its inlined frames first.
    fn location(&mut self, frames: &[&StackFrame]) -> u64 {
        let last = frames[frames.len() - 1];
        let module = last.module.clone().unwrap_or_default();
        let key = (module.clone(), last.addr.clone());
        if let Some(id) = self.locations.get(&key) {
            return *id;
        }
        let id = self.p.location.len() as u64 + 1;
        let mapping_id = if module.is_empty() {
            0
        } else {
            self.mapping(&module)
        };
        let line = frames
            .iter()
            .map(|f| Line {
                function_id: self.function(f),
                line: f.line.map_or(0, i64::from),
            })
            .collect();
        let address = u64::from_str_radix(last.addr.trim_start_matches("0x"), 16).unwrap_or(0);
        self.p.location.push(Location {
            id,
            mapping_id,
            address,
            line,
        });
        self.locations.insert(key, id);
        id
    }
}

/// Frames grouped by address: an address's inlined frames with the frame
/// they were inlined into, which ends the run.
fn by_address(stack: &[StackFrame]) -> Vec<Vec<&StackFrame>> {
    let mut out: Vec<Vec<&StackFrame>> = Vec::new();
    let mut run: Vec<&StackFrame> = Vec::new();
    for f in stack {
        run.push(f);
        if !f.inlined {
            out.push(std::mem::take(&mut run));
        }
    }
    if !run.is_empty() {
        out.push(run);
    }
    out
}

/// The profile of a report's leak groups (not gzipped).
pub fn profile(report: &Report, started_unix_s: u64) -> Profile {
    let mut b = Builder::default();
    b.s("");
    let objects = b.s("leaked_objects");
    let count = b.s("count");
    let space = b.s("leaked_space");
    let bytes = b.s("bytes");
    b.p.sample_type = vec![
        ValueType {
            r#type: objects,
            unit: count,
        },
        ValueType {
            r#type: space,
            unit: bytes,
        },
    ];
    b.p.default_sample_type = objects;
    let (kind, resource) = (b.s("kind"), b.s("resource"));
    for g in &report.leaks {
        let location_id = by_address(&g.stack)
            .iter()
            .map(|frames| b.location(frames))
            .collect();
        let label = vec![
            Label {
                key: kind,
                str: b.s(&g.kind),
            },
            Label {
                key: resource,
                str: b.s(&g.resource),
            },
        ];
        b.p.sample.push(Sample {
            location_id,
            value: vec![g.count as i64, g.bytes as i64],
            label,
        });
    }
    let comment = format!(
        "leakscope: resources outstanding at the end of `{}`",
        report.target.command.join(" ")
    );
    b.p.comment = vec![b.s(&comment)];
    b.p.time_nanos = (started_unix_s as i64).saturating_mul(1_000_000_000);
    b.p.duration_nanos = (report.duration_s * 1e9) as i64;
    b.p
}

/// The gzipped profile.
pub fn render_pprof(report: &Report, started_unix_s: u64) -> Vec<u8> {
    let raw = profile(report, started_unix_s).encode_to_vec();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&raw).expect("writing to memory");
    gz.finish().expect("writing to memory")
}
