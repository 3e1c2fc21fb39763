//! `docs/proto.md` is generated from the published `.proto` files (`proto/`), comments
//! included, by this test: it fails when the file is stale, and writes it with
//! `HERALD_WRITE_PROTO_DOCS=1 cargo test -p herald-server --test proto_docs`. protox
//! compiles the files (no system `protoc`, nothing downloaded).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::{
    DescriptorProto, EnumDescriptorProto, FieldDescriptorProto, FileDescriptorProto,
    ServiceDescriptorProto,
};

/// The files with services; what they import is documented too.
const FILES: [&str; 4] = [
    "centrifugo/api.proto",
    "herald/api.proto",
    "centrifugo/unistream.proto",
    "herald/client_stream.proto",
];

// Field numbers of descriptor.proto, for source-code-info paths.
const FILE_MESSAGES: i32 = 4;
const FILE_ENUMS: i32 = 5;
const FILE_SERVICES: i32 = 6;
const FILE_SYNTAX: i32 = 12;
const MESSAGE_FIELDS: i32 = 2;
const MESSAGE_NESTED: i32 = 3;
const MESSAGE_ENUMS: i32 = 4;
const ENUM_VALUES: i32 = 2;
const SERVICE_METHODS: i32 = 2;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Comments by source path: the leading comment (or the trailing one when there is none),
/// and, for the file, the detached comments before `syntax`.
struct Comments(HashMap<Vec<i32>, String>);

impl Comments {
    fn of(file: &FileDescriptorProto) -> Self {
        let mut map = HashMap::new();
        for location in file.source_code_info.iter().flat_map(|info| &info.location) {
            let mut text = location
                .leading_comments
                .clone()
                .filter(|c| !c.trim().is_empty())
                .or_else(|| location.trailing_comments.clone())
                .unwrap_or_default();
            if location.path == [FILE_SYNTAX] {
                text = location.leading_detached_comments.join("\n");
            }
            let text = tidy(&text);
            if !text.is_empty() {
                map.insert(location.path.clone(), text);
            }
        }
        Self(map)
    }

    fn get(&self, path: &[i32]) -> &str {
        self.0.get(path).map_or("", String::as_str)
    }
}

/// A comment as Markdown: its lines without the one-space indent, paragraphs kept.
fn tidy(comment: &str) -> String {
    comment
        .lines()
        .map(|line| line.strip_prefix(' ').unwrap_or(line).trim_end())
        .collect::<Vec<_>>()
        .join("\n")
        .trim()
        .to_owned()
}

/// A comment in one table cell.
fn cell(comment: &str) -> String {
    comment
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .replace('|', "\\|")
}

fn short_type(name: &str, package: &str) -> String {
    let name = name.trim_start_matches('.');
    name.strip_prefix(package)
        .and_then(|rest| rest.strip_prefix('.'))
        .unwrap_or(name)
        .to_owned()
}

fn scalar(kind: Type) -> &'static str {
    match kind {
        Type::Double => "double",
        Type::Float => "float",
        Type::Int64 => "int64",
        Type::Uint64 => "uint64",
        Type::Int32 => "int32",
        Type::Fixed64 => "fixed64",
        Type::Fixed32 => "fixed32",
        Type::Bool => "bool",
        Type::String => "string",
        Type::Bytes => "bytes",
        Type::Uint32 => "uint32",
        Type::Sfixed32 => "sfixed32",
        Type::Sfixed64 => "sfixed64",
        Type::Sint32 => "sint32",
        Type::Sint64 => "sint64",
        Type::Group | Type::Message | Type::Enum => "",
    }
}

fn field_type(field: &FieldDescriptorProto, message: &DescriptorProto, package: &str) -> String {
    let base = match field.r#type() {
        Type::Message | Type::Enum | Type::Group => short_type(field.type_name(), package),
        kind => scalar(kind).to_owned(),
    };
    if field.proto3_optional() {
        // Presence is tracked: unset differs from the zero value.
        return format!("optional {base}");
    }
    if field.label() != Label::Repeated {
        return base;
    }
    // A map is a repeated entry message nested in this one.
    let entry = field.type_name().rsplit('.').next().unwrap_or_default();
    if let Some(entry) = message.nested_type.iter().find(|nested| {
        nested.name() == entry && nested.options.as_ref().is_some_and(|o| o.map_entry())
    }) {
        let key = field_type(&entry.field[0], entry, package);
        let value = field_type(&entry.field[1], entry, package);
        return format!("map<{key}, {value}>");
    }
    format!("repeated {base}")
}

fn render_service(out: &mut String, service: &ServiceDescriptorProto, path: &[i32], file: &Ctx) {
    let _ = writeln!(out, "### service `{}.{}`\n", file.package, service.name());
    push_paragraph(out, file.comments.get(path));
    for (j, method) in service.method.iter().enumerate() {
        let stream = |yes: bool| if yes { "stream " } else { "" };
        let _ = writeln!(
            out,
            "- `rpc {}({}{}) returns ({}{})`",
            method.name(),
            stream(method.client_streaming()),
            short_type(method.input_type(), &file.package),
            stream(method.server_streaming()),
            short_type(method.output_type(), &file.package),
        );
        let mut method_path = path.to_vec();
        method_path.extend([SERVICE_METHODS, j as i32]);
        let comment = file.comments.get(&method_path);
        if !comment.is_empty() {
            let _ = writeln!(out, "  {}", cell(comment));
        }
    }
    out.push('\n');
}

fn push_paragraph(out: &mut String, text: &str) {
    if !text.is_empty() {
        out.push_str(text);
        out.push_str("\n\n");
    }
}

fn render_enum(out: &mut String, name: &str, item: &EnumDescriptorProto, path: &[i32], file: &Ctx) {
    let _ = writeln!(out, "### enum `{name}`\n");
    push_paragraph(out, file.comments.get(path));
    out.push_str("| value | number | description |\n|---|---|---|\n");
    for (j, value) in item.value.iter().enumerate() {
        let mut value_path = path.to_vec();
        value_path.extend([ENUM_VALUES, j as i32]);
        let _ = writeln!(
            out,
            "| `{}` | {} | {} |",
            value.name(),
            value.number(),
            cell(file.comments.get(&value_path))
        );
    }
    out.push('\n');
}

fn render_message(
    out: &mut String,
    name: &str,
    message: &DescriptorProto,
    path: &[i32],
    file: &Ctx,
) {
    let _ = writeln!(out, "### message `{name}`\n");
    push_paragraph(out, file.comments.get(path));
    if message.field.is_empty() {
        out.push_str("No fields.\n\n");
    } else {
        out.push_str("| field | number | type | description |\n|---|---|---|---|\n");
        for (j, field) in message.field.iter().enumerate() {
            let mut field_path = path.to_vec();
            field_path.extend([MESSAGE_FIELDS, j as i32]);
            let _ = writeln!(
                out,
                "| `{}` | {} | `{}` | {} |",
                field.name(),
                field.number(),
                field_type(field, message, &file.package),
                cell(file.comments.get(&field_path))
            );
        }
        out.push('\n');
    }
    for (j, item) in message.enum_type.iter().enumerate() {
        let mut enum_path = path.to_vec();
        enum_path.extend([MESSAGE_ENUMS, j as i32]);
        render_enum(
            out,
            &format!("{name}.{}", item.name()),
            item,
            &enum_path,
            file,
        );
    }
    for (j, nested) in message.nested_type.iter().enumerate() {
        if nested.options.as_ref().is_some_and(|o| o.map_entry()) {
            continue;
        }
        let mut nested_path = path.to_vec();
        nested_path.extend([MESSAGE_NESTED, j as i32]);
        render_message(
            out,
            &format!("{name}.{}", nested.name()),
            nested,
            &nested_path,
            file,
        );
    }
}

struct Ctx {
    package: String,
    comments: Comments,
}

fn render() -> String {
    let root = repo().join("proto");
    let mut compiler = protox::Compiler::new([&root]).expect("proto/ is readable");
    compiler.include_source_info(true).include_imports(true);
    compiler.open_files(FILES).expect("proto/ compiles");
    let mut files = compiler.file_descriptor_set().file;
    files.sort_by(|a, b| a.name().cmp(b.name()));
    let mut out = String::from(
        "# Protobuf reference\n\n\
         <!-- Generated from proto/ by crates/herald-server/tests/proto_docs.rs; do not edit.\n     \
         HERALD_WRITE_PROTO_DOCS=1 cargo test -p herald-server --test proto_docs -->\n\n\
         The `.proto` files Herald publishes in [`proto/`](../proto), with their comments. How to \
         use the services: [grpc.md](grpc.md).\n\n",
    );
    for file in &files {
        let _ = writeln!(out, "- [`{0}`](#{1})", file.name(), anchor(file.name()));
    }
    out.push('\n');
    for file in &files {
        let ctx = Ctx {
            package: file.package().to_owned(),
            comments: Comments::of(file),
        };
        let _ = writeln!(out, "## {}\n", file.name());
        let _ = writeln!(out, "Package `{}`.\n", file.package());
        push_paragraph(&mut out, ctx.comments.get(&[FILE_SYNTAX]));
        for (i, service) in file.service.iter().enumerate() {
            render_service(&mut out, service, &[FILE_SERVICES, i as i32], &ctx);
        }
        for (i, message) in file.message_type.iter().enumerate() {
            render_message(
                &mut out,
                message.name(),
                message,
                &[FILE_MESSAGES, i as i32],
                &ctx,
            );
        }
        for (i, item) in file.enum_type.iter().enumerate() {
            render_enum(&mut out, item.name(), item, &[FILE_ENUMS, i as i32], &ctx);
        }
    }
    let mut out = out.trim_end().to_owned();
    out.push('\n');
    out
}

/// GitHub's anchor for a heading.
fn anchor(heading: &str) -> String {
    heading
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == '-' || *c == '_' || *c == ' ')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

#[test]
fn docs_proto_md_is_generated_from_the_published_protos() {
    let path = repo().join("docs/proto.md");
    let generated = render();
    if std::env::var_os("HERALD_WRITE_PROTO_DOCS").is_some() {
        std::fs::write(&path, &generated).expect("write docs/proto.md");
        return;
    }
    let current = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        current == generated,
        "docs/proto.md is stale: run `HERALD_WRITE_PROTO_DOCS=1 cargo test -p herald-server \
         --test proto_docs` and commit it"
    );
}

#[test]
fn every_service_method_and_message_of_the_protos_is_in_the_docs() {
    let generated = render();
    for needle in [
        "### service `centrifugal.centrifugo.api.CentrifugoApi`",
        "`rpc Consume(ConnectRequest) returns (stream Push)`",
        "`rpc Connect(stream centrifugal.centrifuge.protocol.Command) returns (stream centrifugal.centrifuge.protocol.Reply)`",
        "### message `Command`",
        "| `subs` | 3 | `map<string, SubscribeRequest>` |",
        "### enum `Push.PushType`",
    ] {
        assert!(generated.contains(needle), "missing {needle:?}");
    }
}
