//! TOML configuration files for `greyfed coordinator` and `greyfed
//! participant`.
//!
//! A file has one table per command, and every command-line flag of that
//! command is a key of its table, spelled like the flag without the dashes
//! (`image-key`; `image_key` and the flag's aliases are accepted too):
//!
//! ```toml
//! [coordinator]
//! listen = "0.0.0.0:7447"
//! cert = "coordinator.pem"      # relative paths are relative to this file
//! participants = 10
//! rounds = 20
//!
//! [participant]
//! coordinator = "coord.example.org:7447"
//! ca = "ca.pem"
//! cert = "participant-cert.pem"
//! key = "participant-key.pem"
//! image-key = "image.key"
//! plain = false                 # switches take true or false
//! ```
//!
//! `--config FILE` on the command line reads the command's table; flags given
//! on the command line override the file's keys. Values are checked by the
//! same parsers as the flags, and every error names the file, line and
//! column. Files are at most [`MAX_CONFIG_BYTES`] long.

use std::any::TypeId;
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::io::Read;
use std::ops::Range;
use std::path::{Path, PathBuf};

use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::{ArgAction, Command};
use toml_edit::{Document, Item, Value};

/// The commands that read configuration files; each is a table of a file.
pub const SECTIONS: &[&str] = &["coordinator", "participant"];

/// Largest configuration file read, in bytes.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// What is wrong with a configuration file, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file.
    pub path: PathBuf,
    /// 1-based line and column of the offending text, when known.
    pub position: Option<(usize, usize)>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.position {
            Some((line, col)) => {
                write!(f, "{}:{line}:{col}: {}", self.path.display(), self.message)
            }
            None => write!(f, "{}: {}", self.path.display(), self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

/// One key of a command's table, turned into command-line arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigEntry {
    /// The flag's long name (`image-key`).
    pub flag: String,
    /// The arguments the key stands for (`--image-key=/etc/greyfed/image.key`;
    /// none for a switch set to false).
    pub args: Vec<OsString>,
    /// 1-based line of the key.
    pub line: usize,
}

/// A parsed configuration file: per command, its entries in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigFile {
    /// The file.
    pub path: PathBuf,
    /// `(command, entries)` for each table present.
    pub sections: Vec<(String, Vec<ConfigEntry>)>,
}

impl ConfigFile {
    /// Reads and checks `path` against the flags of `cli` (the whole
    /// `greyfed` command): unknown tables or keys, values of the wrong kind
    /// and values the flag's parser refuses are errors with their line.
    pub fn load(path: &Path, cli: &Command) -> Result<Self, ConfigError> {
        let text = read_limited(path)?;
        Self::parse(path, &text, cli)
    }

    /// As [`ConfigFile::load`], from text already read.
    pub fn parse(path: &Path, text: &str, cli: &Command) -> Result<Self, ConfigError> {
        let at = |span: Option<Range<usize>>, message: String| ConfigError {
            path: path.to_path_buf(),
            position: span.map(|s| line_col(text, s.start)),
            message,
        };
        let doc =
            Document::parse(text).map_err(|e| at(e.span(), e.message().trim().to_string()))?;
        let base = path.parent().unwrap_or(Path::new(""));
        let mut sections = Vec::new();
        for (name, item) in doc.as_table().iter() {
            let key_span = doc.as_table().key(name).and_then(|k| k.span());
            let Some(table) = item.as_table() else {
                return Err(at(
                    key_span,
                    format!("`{name}` must be a table such as [coordinator] or [participant]"),
                ));
            };
            let Some(cmd) = SECTIONS
                .contains(&name)
                .then(|| cli.find_subcommand(name))
                .flatten()
            else {
                return Err(at(
                    key_span.or(table.span()),
                    format!(
                        "unknown table [{name}]; expected one of: {}",
                        SECTIONS.join(", ")
                    ),
                ));
            };
            let mut entries = Vec::new();
            for (key, value) in table.iter() {
                let span = table.key(key).and_then(|k| k.span());
                let entry = entry(cli, cmd, name, key, value, base)
                    .map_err(|message| at(span.clone(), message))?;
                entries.push(ConfigEntry {
                    line: span.map_or(0, |s| line_col(text, s.start).0),
                    ..entry
                });
            }
            sections.push((name.to_string(), entries));
        }
        Ok(Self {
            path: path.to_path_buf(),
            sections,
        })
    }

    /// The entries of `command`'s table (empty if the file has none).
    pub fn entries(&self, command: &str) -> &[ConfigEntry] {
        self.sections
            .iter()
            .find(|(name, _)| name == command)
            .map_or(&[], |(_, e)| e.as_slice())
    }

    /// Parses `command`'s table alone with `cli`, as if all its keys were
    /// given as flags, and explains what clap refuses (conflicts, required
    /// flags missing from the file), with the line where there is one.
    pub fn dry_run(&self, cli: &Command, command: &str) -> Result<(), ConfigError> {
        let entries = self.entries(command);
        let mut argv: Vec<OsString> = vec!["greyfed".into(), command.into()];
        argv.extend(entries.iter().flat_map(|e| e.args.iter().cloned()));
        let Err(err) = cli.clone().try_get_matches_from(argv) else {
            return Ok(());
        };
        let line = invalid_flag(&err).and_then(|flag| {
            entries
                .iter()
                .find(|e| flag.starts_with(&format!("--{}", e.flag)))
                .map(|e| (e.line, 1))
        });
        let message = match (err.kind(), err.get(ContextKind::InvalidArg)) {
            (ErrorKind::MissingRequiredArgument, Some(ContextValue::Strings(flags))) => {
                format!("required flags missing: {}", flags.join(", "))
            }
            _ => format!("[{command}]: {}", first_line(&err)),
        };
        Err(ConfigError {
            path: self.path.clone(),
            position: line,
            message,
        })
    }
}

/// Rewrites a command line so that `--config FILE` after `coordinator` or
/// `participant` takes effect: the file's keys for that command become
/// flags placed before the command line's own, skipping every flag the
/// command line gives itself (so flags override the file). Command lines
/// without `--config` come back unchanged.
pub fn apply(argv: Vec<OsString>, cli: &Command) -> Result<Vec<OsString>, ConfigError> {
    let Some(sub_at) = argv
        .iter()
        .skip(1)
        .position(|a| SECTIONS.iter().any(|s| a == OsStr::new(s)))
        .map(|i| i + 1)
    else {
        return Ok(argv);
    };
    let command = argv[sub_at].to_string_lossy().into_owned();
    let rest = &argv[sub_at + 1..];
    let mut config = None;
    for (i, a) in rest.iter().enumerate() {
        let a = a.to_string_lossy();
        if a == "--" {
            break;
        }
        if a == "--config" {
            config = rest.get(i + 1).map(PathBuf::from);
        } else if let Some(path) = a.strip_prefix("--config=") {
            config = Some(PathBuf::from(path));
        }
    }
    let Some(path) = config else {
        return Ok(argv);
    };
    let file = ConfigFile::load(&path, cli)?;
    let mut out: Vec<OsString> = argv[..=sub_at].to_vec();
    for e in file.entries(&command) {
        if !flag_given(rest, &e.flag) {
            out.extend(e.args.iter().cloned());
        }
    }
    out.extend(rest.iter().cloned());
    Ok(out)
}

/// Whether the arguments `args` give `--flag`, as `--flag VALUE` or
/// `--flag=VALUE` (or as a switch).
pub fn flag_given(args: &[OsString], flag: &str) -> bool {
    let long = format!("--{flag}");
    let with_value = format!("{long}=");
    args.iter().any(|a| {
        let a = a.to_string_lossy();
        a == long.as_str() || a.starts_with(&with_value)
    })
}

/// Reads at most [`MAX_CONFIG_BYTES`] of UTF-8 text.
fn read_limited(path: &Path) -> Result<String, ConfigError> {
    let err = |message: String| ConfigError {
        path: path.to_path_buf(),
        position: None,
        message,
    };
    let file = std::fs::File::open(path).map_err(|e| err(format!("cannot open: {e}")))?;
    let mut bytes = Vec::new();
    file.take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| err(format!("cannot read: {e}")))?;
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        return Err(err(format!(
            "larger than {MAX_CONFIG_BYTES} bytes; not a greyfed configuration file"
        )));
    }
    String::from_utf8(bytes).map_err(|e| {
        let offset = e.utf8_error().valid_up_to();
        let text = String::from_utf8_lossy(&e.as_bytes()[..offset]).into_owned();
        ConfigError {
            path: path.to_path_buf(),
            position: Some(line_col(&text, offset)),
            message: "not UTF-8 text".into(),
        }
    })
}

/// Turns `key = value` of `section` into the flag's arguments, checking the
/// key exists and the value parses as the flag would.
fn entry(
    cli: &Command,
    cmd: &Command,
    section: &str,
    key: &str,
    item: &Item,
    base: &Path,
) -> Result<ConfigEntry, String> {
    let flag = key.replace('_', "-");
    let arg = cmd
        .get_arguments()
        .find(|a| {
            a.get_long() != Some("config")
                && (a.get_long() == Some(flag.as_str())
                    || a.get_all_aliases()
                        .is_some_and(|v| v.contains(&flag.as_str())))
        })
        .ok_or_else(|| unknown_key(cmd, section, key))?;
    let flag = arg.get_long().unwrap_or(&flag).to_string();
    let value = item
        .as_value()
        .ok_or_else(|| format!("`{key}` must be a value, not a table"))?;
    let long = format!("--{flag}");
    let args = match arg.get_action() {
        ArgAction::SetTrue | ArgAction::SetFalse => match value.as_bool() {
            Some(true) => vec![OsString::from(&long)],
            Some(false) => Vec::new(),
            None => return Err(format!("`{key}` is a switch: write true or false")),
        },
        action if action.takes_values() => {
            let paths = arg.get_value_parser().type_id() == TypeId::of::<PathBuf>();
            let values: Vec<&Value> = match value {
                Value::Array(array) if matches!(action, ArgAction::Append) => {
                    array.iter().collect()
                }
                Value::Array(_) => return Err(format!("`{key}` takes one value, not a list")),
                v => vec![v],
            };
            let mut args = Vec::new();
            for v in values {
                let mut text = scalar(key, v)?;
                if paths && Path::new(&text).is_relative() && !base.as_os_str().is_empty() {
                    text = base.join(&text).to_string_lossy().into_owned();
                }
                args.push(OsString::from(format!("{long}={text}")));
            }
            args
        }
        _ => return Err(format!("`{key}` cannot be set in a configuration file")),
    };
    for a in &args {
        check_value(cli, section, a)?;
    }
    Ok(ConfigEntry {
        flag,
        args,
        line: 0,
    })
}

/// Refuses a value the flag's parser refuses; other complaints (a required
/// flag this one argument lacks) are left to the whole command line.
fn check_value(cli: &Command, section: &str, arg: &OsStr) -> Result<(), String> {
    let argv = [OsStr::new("greyfed"), OsStr::new(section), arg];
    match cli.clone().try_get_matches_from(argv) {
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::InvalidValue
                    | ErrorKind::ValueValidation
                    | ErrorKind::InvalidUtf8
                    | ErrorKind::WrongNumberOfValues
                    | ErrorKind::TooManyValues
            ) =>
        {
            Err(first_line(&e))
        }
        _ => Ok(()),
    }
}

/// A TOML scalar as the text a flag takes.
fn scalar(key: &str, v: &Value) -> Result<String, String> {
    Ok(match v {
        Value::String(s) => s.value().clone(),
        Value::Integer(i) => i.value().to_string(),
        Value::Float(f) => f.value().to_string(),
        Value::Boolean(b) => b.value().to_string(),
        Value::Datetime(_) | Value::Array(_) | Value::InlineTable(_) => {
            return Err(format!("`{key}` must be a string, number or boolean"));
        }
    })
}

/// "unknown key" with the closest flag, if one is close.
fn unknown_key(cmd: &Command, section: &str, key: &str) -> String {
    let flag = key.replace('_', "-");
    let closest = cmd
        .get_arguments()
        .filter_map(|a| a.get_long())
        .filter(|l| *l != "config")
        .map(|l| (edit_distance(l, &flag), l))
        .min();
    match closest {
        Some((d, l)) if d <= 3 => {
            format!("unknown key `{key}` in [{section}]; did you mean `{l}`?")
        }
        _ => format!(
            "unknown key `{key}` in [{section}]; keys are the flags of `greyfed {section} --help`"
        ),
    }
}

/// Levenshtein distance, for suggestions.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let next = (prev + usize::from(ca != *cb))
                .min(row[j] + 1)
                .min(row[j + 1] + 1);
            prev = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

/// The flag a clap error is about, such as `--image-key <FILE>`.
fn invalid_flag(err: &clap::Error) -> Option<String> {
    match err.get(ContextKind::InvalidArg)? {
        ContextValue::String(s) => Some(s.clone()),
        ContextValue::Strings(v) => v.first().cloned(),
        _ => None,
    }
}

/// A clap error's first line without its `error: ` prefix.
fn first_line(err: &clap::Error) -> String {
    let text = err.render().to_string();
    let line = text.lines().next().unwrap_or_default();
    line.strip_prefix("error: ")
        .unwrap_or(line)
        .trim()
        .to_string()
}

/// 1-based line and column of byte `offset` in `text`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;
    use crate::cli::Cli;

    fn parse(text: &str) -> Result<ConfigFile, ConfigError> {
        ConfigFile::parse(Path::new("/etc/greyfed/node.toml"), text, &Cli::command())
    }

    fn err(text: &str) -> ConfigError {
        parse(text).expect_err("should be refused")
    }

    #[test]
    fn keys_become_flags_and_relative_paths_follow_the_file() {
        let file = parse(
            "[participant]\ncoordinator = \"10.0.0.1:7447\"\nca = \"ca.pem\"\nimage_key = \"/keys/image.key\"\nblock-size = 4\nplain = false\nreconnect-for = 5\ncert = \"c.pem\"\nkey = \"k.pem\"\n",
        )
        .unwrap();
        let args: Vec<_> = file
            .entries("participant")
            .iter()
            .flat_map(|e| e.args.iter().map(|a| a.to_string_lossy().into_owned()))
            .collect();
        assert_eq!(
            args,
            [
                "--coordinator=10.0.0.1:7447",
                "--ca=/etc/greyfed/ca.pem",
                "--image-key=/keys/image.key",
                "--block-size=4",
                "--reconnect-for=5",
                "--cert=/etc/greyfed/c.pem",
                "--key=/etc/greyfed/k.pem",
            ]
        );
        assert_eq!(file.entries("participant")[2].line, 4);
        assert!(file.entries("coordinator").is_empty());
        file.dry_run(&Cli::command(), "participant").unwrap();
    }

    #[test]
    fn errors_name_the_line_and_column() {
        let e = err("[coordinator]\nlisten = \"0.0.0.0:7447\"\nrounds = \"many\"\n");
        assert_eq!(e.position, Some((3, 1)));
        assert!(e.message.contains("many"), "{e}");
        assert!(
            e.to_string().starts_with("/etc/greyfed/node.toml:3:1: "),
            "{e}"
        );

        let e = err("[coordinator]\nround = 3\n");
        assert_eq!(e.position, Some((2, 1)));
        assert!(e.message.contains("did you mean `rounds`"), "{e}");

        let e = err("[coordinator]\nlisten = 0.0.0.0\n");
        assert_eq!(e.position.map(|p| p.0), Some(2), "TOML syntax error: {e}");

        let e = err("[participant]\ncoordinator = \"h:1\"\nplain = \"yes\"\n");
        assert_eq!(e.position, Some((3, 1)));
        assert!(e.message.contains("switch"), "{e}");

        let e = err("[participant]\n  cipher = \"scramble\"\n");
        assert_eq!(e.position, Some((2, 3)));

        let e = err("[coordinatr]\nrounds = 3\n");
        assert!(e.message.contains("unknown table [coordinatr]"), "{e}");
        assert_eq!(e.position.map(|p| p.0), Some(1));

        let e = err("rounds = 3\n");
        assert!(e.message.contains("must be a table"), "{e}");

        let e = err("[coordinator]\nrounds = [1, 2]\n");
        assert!(e.message.contains("one value"), "{e}");

        let e = err("[coordinator]\nconfig = \"other.toml\"\n");
        assert!(e.message.contains("unknown key `config`"), "{e}");

        let e = err("[coordinator.training]\nrounds = 3\n");
        assert!(e.message.contains("unknown key `training`"), "{e}");
    }

    #[test]
    fn dry_run_reports_conflicts_at_their_line_and_missing_flags() {
        let file =
            parse("[participant]\ncoordinator = \"h:1\"\nca = \"ca.pem\"\nkey-file = \"k\"\nplain = true\n")
                .unwrap();
        let e = file.dry_run(&Cli::command(), "participant").unwrap_err();
        assert!(e.message.contains("cannot be used with"), "{e}");
        assert!(matches!(e.position, Some((4 | 5, 1))), "{e}");

        let file = parse("[coordinator]\nrounds = 3\n").unwrap();
        let e = file.dry_run(&Cli::command(), "coordinator").unwrap_err();
        assert!(e.message.contains("required flags missing: --cert"), "{e}");
        assert!(e.message.contains("--key"), "{e}");
        assert_eq!(e.position, None);
    }

    #[test]
    fn command_line_flags_override_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.toml");
        std::fs::write(
            &path,
            "[participant]\ncoordinator = \"file:1\"\nca = \"/ca.pem\"\ncert = \"/c.pem\"\nkey = \"/k.pem\"\nplain = true\nshard = \"1/4\"\n",
        )
        .unwrap();
        let argv: Vec<OsString> = [
            "greyfed",
            "participant",
            "--config",
            path.to_str().unwrap(),
            "--coordinator=flag:2",
        ]
        .map(OsString::from)
        .to_vec();
        let out = apply(argv, &Cli::command()).unwrap();
        let cli = <Cli as clap::Parser>::try_parse_from(out).unwrap();
        let crate::cli::Command::Participant(p) = cli.command else {
            panic!("not a participant command");
        };
        assert_eq!(p.coordinator, "flag:2");
        assert_eq!(p.ca, PathBuf::from("/ca.pem"));
        assert!(p.plain);
        assert_eq!(p.shard, "1/4");
        assert_eq!(p.config.as_deref(), Some(path.as_path()));

        let plain = vec![OsString::from("greyfed"), OsString::from("simulate")];
        assert_eq!(apply(plain.clone(), &Cli::command()).unwrap(), plain);
    }

    #[test]
    fn oversized_and_binary_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big.toml");
        std::fs::write(&big, vec![b'#'; MAX_CONFIG_BYTES as usize + 1]).unwrap();
        let e = ConfigFile::load(&big, &Cli::command()).unwrap_err();
        assert!(e.message.contains("larger than"), "{e}");
        let bin = dir.path().join("bin.toml");
        std::fs::write(&bin, b"[coordinator]\n\xff\xfe").unwrap();
        let e = ConfigFile::load(&bin, &Cli::command()).unwrap_err();
        assert_eq!(e.position, Some((2, 1)), "{e}");
        let e = ConfigFile::load(&dir.path().join("missing.toml"), &Cli::command()).unwrap_err();
        assert!(e.message.contains("cannot open"), "{e}");
    }

    #[test]
    fn edit_distance_counts_edits() {
        assert_eq!(edit_distance("rounds", "round"), 1);
        assert_eq!(edit_distance("listen", "lsiten"), 2);
        assert_eq!(edit_distance("", "abc"), 3);
    }
}
