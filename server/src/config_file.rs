//! `weir --config weir.toml`: every option the command line and the environment take, from a TOML file.
//!
//! Keys are the long flags without their leading dashes (`listen`, `data-dir`, `http-listen`, `epoch-interval-ms`,
//! `allow-file-dir`, `log-level`, `log-format`, ...); values are strings, numbers or booleans, or arrays of them for
//! a flag that repeats. A key that names no flag is an error listing the valid keys. The file's values become the
//! flags' defaults, so a flag on the command line wins over its environment variable, which wins over the file,
//! which wins over the built-in default.

use clap::Command;

/// Why a configuration file cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigFileError {
    #[error("{path}: {reason}")]
    Parse { path: String, reason: String },
    #[error("{path}: unknown key \"{key}\"; the valid keys are: {valid}")]
    UnknownKey { path: String, key: String, valid: String },
    #[error("{path}: key \"{key}\" takes a string, a number, a boolean, or an array of them")]
    Value { path: String, key: String },
}

/// Flags that are not settings of the server.
const NOT_SETTINGS: &[&str] = &["config", "help", "version"];

/// `command` with the settings of the configuration file `text` (read from `path`) as its flags' defaults.
pub fn apply(mut command: Command, path: &str, text: &str) -> Result<Command, ConfigFileError> {
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| ConfigFileError::Parse { path: path.into(), reason: e.message().to_string() })?;
    let settings: Vec<(String, clap::Id)> = command
        .get_arguments()
        .filter_map(|arg| Some((arg.get_long()?.to_string(), arg.get_id().clone())))
        .filter(|(long, _)| !NOT_SETTINGS.contains(&long.as_str()))
        .collect();
    for (key, value) in table {
        let Some((_, id)) = settings.iter().find(|(long, _)| *long == key) else {
            let valid = settings.iter().map(|(long, _)| long.as_str()).collect::<Vec<_>>().join(", ");
            return Err(ConfigFileError::UnknownKey { path: path.into(), key, valid });
        };
        let values = match value {
            toml::Value::Array(items) => items.into_iter().map(scalar).collect::<Option<Vec<_>>>(),
            other => scalar(other).map(|value| vec![value]),
        };
        let Some(values) = values else { return Err(ConfigFileError::Value { path: path.into(), key }) };
        command = command.mut_arg(id.clone(), |arg| arg.default_values(values));
    }
    Ok(command)
}

/// The path given with `--config PATH` (or `--config=PATH`) in `args`, if any.
pub fn path_in_args(args: &[String]) -> Option<String> {
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        if arg == "--config" {
            return args.next().cloned();
        }
        if let Some(path) = arg.strip_prefix("--config=") {
            return Some(path.to_string());
        }
    }
    None
}

fn scalar(value: toml::Value) -> Option<String> {
    match value {
        toml::Value::String(text) => Some(text),
        toml::Value::Integer(n) => Some(n.to_string()),
        toml::Value::Float(x) => Some(x.to_string()),
        toml::Value::Boolean(b) => Some(b.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use clap::{Arg, ArgAction};

    use super::*;

    fn command() -> Command {
        Command::new("weir")
            .arg(Arg::new("listen").long("listen").default_value("127.0.0.1:5454"))
            .arg(Arg::new("epoch").long("epoch-interval-ms").value_parser(clap::value_parser!(u64)).default_value("50"))
            .arg(Arg::new("dirs").long("allow-file-dir").action(ArgAction::Append))
            .arg(Arg::new("config").long("config"))
    }

    #[test]
    fn the_file_s_values_are_defaults_the_command_line_overrides() {
        let text = "listen = \"0.0.0.0:6000\"\nepoch-interval-ms = 200\nallow-file-dir = [\"/a\", \"/b\"]\n";
        let matches = apply(command(), "weir.toml", text).unwrap().get_matches_from(["weir", "--listen", "[::1]:7"]);
        assert_eq!(matches.get_one::<String>("listen").unwrap(), "[::1]:7");
        assert_eq!(*matches.get_one::<u64>("epoch").unwrap(), 200);
        let dirs: Vec<&String> = matches.get_many::<String>("dirs").unwrap().collect();
        assert_eq!(dirs, ["/a", "/b"]);
        // Without the file, the built-in defaults.
        let matches = command().get_matches_from(["weir"]);
        assert_eq!(*matches.get_one::<u64>("epoch").unwrap(), 50);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors_naming_what_is_valid() {
        let err = apply(command(), "weir.toml", "lsiten = \"x\"").unwrap_err();
        assert_eq!(
            err.to_string(),
            "weir.toml: unknown key \"lsiten\"; the valid keys are: listen, epoch-interval-ms, allow-file-dir"
        );
        let err = apply(command(), "weir.toml", "config = \"other.toml\"").unwrap_err();
        assert!(matches!(err, ConfigFileError::UnknownKey { .. }), "{err}");
        let err = apply(command(), "weir.toml", "[listen]\nport = 1").unwrap_err();
        assert_eq!(err, ConfigFileError::Value { path: "weir.toml".into(), key: "listen".into() });
        let err = apply(command(), "weir.toml", "listen = ").unwrap_err();
        assert!(matches!(err, ConfigFileError::Parse { .. }), "{err}");
        // A value the flag cannot take is the flag's own error when the command line is parsed.
        let command = apply(command(), "weir.toml", "epoch-interval-ms = \"soon\"").unwrap();
        assert!(command.try_get_matches_from(["weir"]).is_err());
    }

    #[test]
    fn the_config_flag_is_found_in_either_spelling() {
        let args = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(path_in_args(&args(&["weir", "--config", "a.toml"])), Some("a.toml".into()));
        assert_eq!(path_in_args(&args(&["weir", "--config=b.toml", "--listen", "x"])), Some("b.toml".into()));
        assert_eq!(path_in_args(&args(&["weir", "--listen", "x"])), None);
    }
}
