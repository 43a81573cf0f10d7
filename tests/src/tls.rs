//! Certificates for the TLS tests (Postgres, and Kafka behind a TLS-terminating proxy), made
//! with openssl's CLI.

use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, bail};

/// In `dir`: `<ca>.crt` and `<ca>.key`, a self-signed CA, and with `server`, `<server>.crt` and
/// `<server>.key`, a certificate for `localhost` (and 127.0.0.1) signed by it. With openssl's CLI.
pub fn make_ca_and_server_cert(dir: &Path, ca: &str, server: Option<&str>) -> anyhow::Result<()> {
    let openssl = |args: &[&str]| -> anyhow::Result<()> {
        let output = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .output()
            .context("running openssl")?;
        if !output.status.success() {
            bail!(
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(())
    };
    let (ca_key, ca_crt) = (format!("{ca}.key"), format!("{ca}.crt"));
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        &format!("/CN=test CA {ca}"),
        "-keyout",
        &ca_key,
        "-out",
        &ca_crt,
    ])?;
    if let Some(server) = server {
        let (key, csr, crt) = (
            format!("{server}.key"),
            format!("{server}.csr"),
            format!("{server}.crt"),
        );
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            &key,
            "-out",
            &csr,
        ])?;
        std::fs::write(
            dir.join("san.ext"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
        )?;
        openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca_crt,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "san.ext",
            "-out",
            &crt,
        ])?;
    }
    Ok(())
}
