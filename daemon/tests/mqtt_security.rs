//! The daemon's MQTT connection under a real mosquitto's security: users with an ACL, and mutual
//! TLS with certificates this test makes; a station that cannot get in is told why.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{Daemon, Mosquitto, Subscriber, CLIP_CAMERA};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

const WAIT: Duration = Duration::from_secs(20);

fn write_station(dir: &Path, station: &str, mqtt: &str) -> std::path::PathBuf {
    let path = dir.join(format!("{station}.toml"));
    let text = format!(
        "[station]\nid = \"{station}\"\n\n[mqtt]\nhost = \"127.0.0.1\"\nkeep_alive_secs = 5\nreconnect_min_secs = 0.2\nreconnect_max_secs = 1\n{mqtt}\n\n{CLIP_CAMERA}loop = true\n"
    );
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn under_an_acl_the_station_publishes_its_own_topics_and_a_dashboard_reads_them() {
    let acl = "user station\ntopic write outpost/acl/#\n\nuser dashboard\ntopic read outpost/#\n";
    let broker = Mosquitto::start_with_users(&[("station", "s3cret"), ("dashboard", "l00k")], Some(acl));
    let mut dashboard = Subscriber::connect_as(broker.port, "outpost/#", Some(("dashboard", "l00k")));
    let dir = tempfile::tempdir().unwrap();
    let mqtt = format!("port = {}\nusername = \"station\"\npassword = \"s3cret\"", broker.port);
    let _daemon = Daemon::run_config(&write_station(dir.path(), "acl", &mqtt));

    dashboard.wait_for_payload("outpost/acl/status", "online", WAIT);
    dashboard.wait_for("the camera's state", WAIT, |m| m.topic == "outpost/acl/camera/status");
    dashboard.wait_for("a motion event", WAIT, |m| m.topic == "outpost/acl/events");
    let outside: Vec<_> =
        dashboard.received().iter().filter(|m| !m.topic.starts_with("outpost/acl/")).cloned().collect();
    assert!(outside.is_empty(), "published outside its own topics: {outside:?}");
}

/// A certificate authority, a broker certificate for 127.0.0.1 and a station's client
/// certificate, written as PEM files into `dir`; and a second authority that signed nothing here.
fn make_certificates(dir: &Path) {
    let authority = |name: &str| {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
    };
    let ca = authority("Outpost test CA");
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    std::fs::write(dir.join("stranger-ca.pem"), authority("Somebody else's CA").pem()).unwrap();

    let leaf = |name: &str, names: Vec<String>, usage: ExtendedKeyUsagePurpose| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(names).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![usage];
        let certificate = params.signed_by(&key, &ca).unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), certificate.pem()).unwrap();
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
    };
    leaf("broker", vec!["127.0.0.1".into(), "localhost".into()], ExtendedKeyUsagePurpose::ServerAuth);
    leaf("station", Vec::new(), ExtendedKeyUsagePurpose::ClientAuth);
}

#[test]
fn mutual_tls_admits_a_station_with_its_certificate_and_tells_the_others_why_not() {
    let certificates = tempfile::tempdir().unwrap();
    let pki = certificates.path();
    make_certificates(pki);
    let broker = Mosquitto::start_configured(common::free_port(), |_| {
        let listener = format!(
            "cafile {0}/ca.pem\ncertfile {0}/broker.pem\nkeyfile {0}/broker.key\nrequire_certificate true\nuse_identity_as_username true",
            pki.display()
        );
        ("allow_anonymous true".into(), listener, true)
    });
    let plain_port = broker.plain_port.unwrap();
    let mut subscriber = Subscriber::connect(plain_port, "outpost/#");
    let dir = tempfile::tempdir().unwrap();
    let pem = |name: &str| pki.join(name).display().to_string();

    let tls = format!(
        "port = {}\n[mqtt.tls]\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"",
        broker.port,
        pem("ca.pem"),
        pem("station.pem"),
        pem("station.key")
    );
    let trusted = Daemon::run_config(&write_station(dir.path(), "tls", &tls));
    subscriber.wait_for_payload("outpost/tls/status", "online", WAIT);
    subscriber.wait_for("a motion event over TLS", WAIT, |m| m.topic == "outpost/tls/events");
    trusted.wait_for_log(&format!("connected to MQTT broker at 127.0.0.1:{}", broker.port), WAIT);

    // No client certificate: the broker ends the handshake.
    let anonymous = format!("port = {}\n[mqtt.tls]\nca_file = \"{}\"", broker.port, pem("ca.pem"));
    let refused = Daemon::run_config(&write_station(dir.path(), "nocert", &anonymous));
    refused.wait_for_log(&format!("cannot connect to MQTT broker at 127.0.0.1:{}", broker.port), WAIT);

    // A broker certificate from an authority the station does not trust.
    let stranger = format!("port = {}\n[mqtt.tls]\nca_file = \"{}\"", broker.port, pem("stranger-ca.pem"));
    let wary = Daemon::run_config(&write_station(dir.path(), "wary", &stranger));
    wary.wait_for_log("UnknownIssuer", WAIT);
    assert!(!subscriber
        .received()
        .iter()
        .any(|m| m.topic.starts_with("outpost/nocert/") || m.topic.starts_with("outpost/wary/")));
}

#[test]
fn a_tls_file_that_is_missing_or_not_pem_is_a_config_error() {
    let certificates = tempfile::tempdir().unwrap();
    make_certificates(certificates.path());
    std::fs::write(certificates.path().join("notes.txt"), "not a certificate\n").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (&"ca_file = \"missing.pem\"".to_string(), "mqtt.tls.ca_file", "missing.pem"),
        (
            &format!("ca_file = \"{}/notes.txt\"", certificates.path().display()),
            "mqtt.tls.ca_file",
            "holds no PEM certificate",
        ),
        (
            &format!("ca_file = \"{0}/ca.pem\"\ncert_file = \"{0}/station.pem\"", certificates.path().display()),
            "mqtt.tls.cert_file",
            "`cert_file` and `key_file` go together",
        ),
        (
            &format!(
                "ca_file = \"{0}/ca.pem\"\ncert_file = \"{0}/station.pem\"\nkey_file = \"{0}/notes.txt\"",
                certificates.path().display()
            ),
            "mqtt.tls.key_file",
            "cannot read a PEM private key",
        ),
    ];
    for (tls, key, message) in cases {
        let config = write_station(dir.path(), "bad", &format!("port = 8883\n[mqtt.tls]\n{tls}"));
        let output = common::outpostd().args(["check-config", config.to_str().unwrap()]).output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(78), "{tls}: {stderr}");
        assert!(
            stderr.contains(key) && stderr.contains(message),
            "{tls}: expected `{key}` and `{message}` in:\n{stderr}"
        );
    }
}
