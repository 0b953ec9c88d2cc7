//! Options that reach the server's own machine, checked against the operator's [`ConnectorPolicy`] before any
//! connector sees them: a local file must be a regular file under an allowed directory, and librdkafka settings that
//! load code or run commands are refused outright (`42501`).

use weir_common::connector::{ConnectorError, ConnectorPolicy};

/// librdkafka settings that load a shared library or run a command inside the server.
const DENIED_KAFKA_PROPERTIES: &[&str] = &[
    "plugin.library.paths",
    "sasl.kerberos.kinit.cmd",
    "ssl.engine.location",
    "ssl_engine.location",
    "ssl.engine.id",
    "ssl.providers",
];

/// The MQTT options that name local files.
const MQTT_FILES: &[&str] = &["tls.ca", "tls.client.cert", "tls.client.key"];

/// Checks the options of a `connector` source or sink. Paths stay as the user wrote them (they name records in
/// `weir_catalog.dead_letters`); every view that reads the source checks them again when it opens the file.
pub(crate) fn apply(
    connector: &str,
    options: &[(String, String)],
    policy: &ConnectorPolicy,
) -> Result<(), ConnectorError> {
    for (key, value) in options {
        let lower = key.to_ascii_lowercase();
        let names_file = match connector {
            "file" => lower == "path",
            "mqtt" => MQTT_FILES.contains(&lower.as_str()),
            "kafka" => match lower.strip_prefix("properties.") {
                Some(property) if DENIED_KAFKA_PROPERTIES.contains(&property) => {
                    return Err(ConnectorError::NotAllowed {
                        key: key.clone(),
                        reason: "it makes librdkafka load code or run a command inside the server".into(),
                        hint: "Weir refuses these librdkafka settings for every user.",
                    });
                }
                // `probe` looks for the system's certificates where OpenSSL keeps them.
                Some(property) => {
                    (property.ends_with(".location")
                        || property.ends_with(".file")
                        || property == "sasl.kerberos.keytab")
                        && value != "probe"
                }
                None => false,
            },
            _ => false,
        };
        if names_file {
            policy.check_file(key, value)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(options: &[(&str, &str)]) -> Vec<(String, String)> {
        options.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn local_files_need_an_allowed_directory_and_code_loading_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("readings.jsonl");
        std::fs::write(&file, "{}\n").unwrap();
        let path = file.display().to_string();
        let nobody = ConnectorPolicy::default();
        let err = apply("file", &pairs(&[("path", &path)]), &nobody).unwrap_err();
        assert_eq!(err.sqlstate(), weir_common::SqlState::INSUFFICIENT_PRIVILEGE);
        assert!(err.to_string().contains("lets no source read local files"), "{err}");

        let allowed = ConnectorPolicy { allowed_dirs: vec![dir.path().canonicalize().unwrap()], unrestricted: false };
        let options = pairs(&[("path", &format!("{}/./readings.jsonl", dir.path().display()))]);
        apply("file", &options, &allowed).unwrap();
        // Outside the directory, even through `..`, and for MQTT's certificates too.
        let outside = format!("{}/../../etc/passwd", dir.path().display());
        assert_eq!(apply("file", &pairs(&[("path", &outside)]), &allowed).unwrap_err().sqlstate().code(), "42501");
        assert!(apply("mqtt", &pairs(&[("tls.ca", "/etc/passwd")]), &allowed).is_err());
        // Devices are never read, whatever the policy.
        let err = apply("file", &pairs(&[("path", "/dev/zero")]), &ConnectorPolicy::unrestricted()).unwrap_err();
        assert_eq!(err.to_string(), "invalid value \"/dev/zero\" for option \"path\": not a regular file");

        let err = apply("kafka", &pairs(&[("properties.plugin.library.paths", "/x.so")]), &allowed).unwrap_err();
        assert_eq!(err.sqlstate().code(), "42501");
        let err = apply("kafka", &pairs(&[("properties.ssl.ca.location", "/etc/ssl/x.pem")]), &allowed).unwrap_err();
        assert_eq!(err.sqlstate().code(), "42501");
        assert!(apply("kafka", &pairs(&[("properties.ssl.ca.location", "probe")]), &allowed).is_ok());
        assert!(apply("kafka", &pairs(&[("properties.fetch.max.bytes", "1048576")]), &nobody).is_ok());
    }
}
