//! The Debian package (`[package.metadata.deb]` in daemon/Cargo.toml, scripts in deploy/debian/),
//! made by cargo-deb from the binary these tests run and installed into a scratch root with
//! `dpkg --root`, its maintainer scripts run chrootless with `DPKG_ROOT` as dpkg sets it. Checked:
//! the files and the conffile, the state directory, `systemd-analyze verify` on the installed unit,
//! then remove (config and state kept) and purge (both gone). The post-install's decisions on a
//! live system (the config not ready, then ready) are checked where `deploy.sh` installs the
//! package on a station, below.
//!
//! `OUTPOST_TEST_DEB` names a package to check instead: test.sh hands over the arm64 package made
//! from the emulated pass's binary.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// dpkg --root runs the scripts that chown the config, and the station needs a mount namespace:
/// both need root. Elsewhere the tests pass after saying so (CI runs as root).
fn not_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        eprintln!("skipped {test}: needs root (dpkg --root, a mount namespace)");
    }
    !root
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn said(output: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

fn run(command: &mut Command) -> Output {
    let output = command.output().unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    assert!(output.status.success(), "{command:?} failed:\n{}", said(&output));
    output
}

/// The package of this build: cargo-deb packs the test profile's binary (`--no-build`), so the
/// check costs seconds, not a release build; what it proves, the package's layout and scripts, is
/// the same for the release build (`deploy/package.sh`). Made once per run, into the target
/// directory: two cargo-deb runs at once share its intermediate files.
fn package_of_this_build() -> PathBuf {
    static PACKAGE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    PACKAGE
        .get_or_init(|| {
            let binary = Path::new(env!("CARGO_BIN_EXE_outpostd"));
            let profile_dir = binary.parent().unwrap();
            let target_dir = profile_dir.parent().unwrap();
            let profile = match profile_dir.file_name().unwrap().to_str().unwrap() {
                "debug" => "dev",
                other => other,
            };
            let output = Command::new("cargo")
                .args(["deb", "-p", "outpostd", "--no-build", "--fast", "--quiet", "--profile", profile, "-o"])
                .arg(target_dir.join("debian-test"))
                .env("CARGO_TARGET_DIR", target_dir)
                .current_dir(repo())
                .output()
                .unwrap();
            let failed = "cargo deb failed (deploy/dev-setup.sh installs cargo-deb)";
            assert!(output.status.success(), "{failed}:\n{}", said(&output));
            PathBuf::from(String::from_utf8(output.stdout).unwrap().trim())
        })
        .clone()
}

/// The package's Depends names a package for every shared library the binary needs, and a libc
/// at least as new as the newest glibc symbol version it links against (readelf reads any
/// architecture's ELF).
fn depends_covers_the_binary(package: &Path, binary: &Path) {
    let depends =
        String::from_utf8(run(Command::new("dpkg-deb").arg("--field").arg(package).arg("Depends")).stdout).unwrap();
    let dynamic = String::from_utf8(run(Command::new("readelf").arg("--dynamic").arg(binary)).stdout).unwrap();
    let needed: Vec<&str> = dynamic
        .lines()
        .filter_map(|l| l.split_once("Shared library: ["))
        .map(|(_, n)| n.trim_end_matches(']'))
        .collect();
    for library in &needed {
        let package = match *library {
            "libc.so.6" | "libm.so.6" | "ld-linux-x86-64.so.2" | "ld-linux-aarch64.so.1" => "libc6 (>= ",
            "libgcc_s.so.1" => "libgcc-s1",
            "libasound.so.2" => "libasound2 (>= 1.2) | libasound2t64",
            other => panic!("{} needs {other}: add its package to Depends in daemon/Cargo.toml", binary.display()),
        };
        assert!(depends.contains(package), "{library} needs `{package}` in Depends: {depends}");
    }
    let versions =
        String::from_utf8(run(Command::new("readelf").arg("--version-info").arg("--wide").arg(binary)).stdout).unwrap();
    let version = |v: &str| v.split('.').map(|n| n.parse::<u32>().unwrap()).collect::<Vec<_>>();
    let newest = versions
        .split_whitespace()
        .filter_map(|word| word.strip_prefix("GLIBC_"))
        .filter(|v| v.chars().all(|c| c.is_ascii_digit() || c == '.'))
        .map(version)
        .max()
        .unwrap();
    let required = depends.split("libc6 (>= ").nth(1).and_then(|rest| rest.split(')').next()).map(version).unwrap();
    assert!(required >= newest, "the binary needs glibc {newest:?}; Depends asks for {required:?}: {depends}");
}

/// An empty system for dpkg: its database and nothing else.
struct ScratchRoot {
    dir: tempfile::TempDir,
    foreign: bool,
}

impl ScratchRoot {
    fn new(package: &Path) -> ScratchRoot {
        let dir = tempfile::tempdir().unwrap();
        let admin = dir.path().join("var/lib/dpkg");
        for sub in ["info", "updates"] {
            std::fs::create_dir_all(admin.join(sub)).unwrap();
        }
        for file in ["status", "available"] {
            std::fs::write(admin.join(file), "").unwrap();
        }
        let package_arch = run(Command::new("dpkg-deb").arg("--field").arg(package).arg("Architecture")).stdout;
        let host_arch = run(Command::new("dpkg").arg("--print-architecture")).stdout;
        ScratchRoot { dir, foreign: package_arch != host_arch }
    }

    fn path(&self, inside: &str) -> PathBuf {
        self.dir.path().join(inside.trim_start_matches('/'))
    }

    /// dpkg on the scratch root, as `dpkg --root` runs scripts: outside a chroot, with DPKG_ROOT.
    /// The root holds no libc or alsa-lib packages, so dependencies are not enforced.
    fn dpkg(&self, args: &[&str]) -> String {
        let mut command = Command::new("dpkg");
        command
            .arg(format!("--root={}", self.dir.path().display()))
            .args(["--force-script-chrootless", "--force-depends", "--log=/dev/null"])
            .env("DPKG_ROOT", self.dir.path());
        if self.foreign {
            command.arg("--force-architecture");
        }
        said(&run(command.args(args)))
    }

    fn query(&self, format: &str) -> String {
        let admin = self.path("var/lib/dpkg");
        let output = run(Command::new("dpkg-query")
            .arg(format!("--admindir={}", admin.display()))
            .args(["-W", "-f", format, "outpostd"]));
        String::from_utf8(output.stdout).unwrap()
    }

    fn mode(&self, inside: &str) -> u32 {
        let path = self.path(inside);
        std::fs::metadata(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).permissions().mode() & 0o7777
    }

    /// `systemd-analyze verify --root` on the installed unit. verify resolves the unit's
    /// dependencies (sysinit.target, ...) and its commands inside the root, so the root is given
    /// what a Debian system with systemd has there: this machine's own units and `/bin/kill`.
    fn verify_unit(&self) {
        let units = self.path("usr/lib/systemd/system");
        for entry in std::fs::read_dir("/usr/lib/systemd/system").unwrap() {
            let entry = entry.unwrap();
            let to = units.join(entry.file_name());
            if !to.exists() && entry.file_type().unwrap().is_file() {
                std::fs::copy(entry.path(), to).unwrap();
            }
        }
        std::fs::create_dir_all(self.path("bin")).unwrap();
        std::fs::copy("/bin/kill", self.path("bin/kill")).unwrap();
        let root = format!("--root={}", self.dir.path().display());
        let output = run(Command::new("systemd-analyze").args(["verify", &root, "outpostd.service"]));
        // Unknown keys and bad values are warnings, with a zero exit status.
        assert!(!said(&output).contains("outpostd.service"), "{}", said(&output));
    }
}

#[test]
fn the_package_installs_into_a_scratch_root_waits_for_a_model_bundle_and_purges_cleanly() {
    if not_root("the package") {
        return;
    }
    let package = match std::env::var_os("OUTPOST_TEST_DEB") {
        Some(given) => PathBuf::from(given),
        None => package_of_this_build(),
    };
    let root = ScratchRoot::new(&package);
    let installed = root.dpkg(&["--install", package.to_str().unwrap()]);

    // The files, where the unit and the docs say they are.
    assert_eq!(root.mode("/usr/bin/outpostd"), 0o755);
    assert_eq!(root.mode("/etc/outpost/outpostd.toml"), 0o640, "the config may hold the broker's password");
    // ... and the service's dynamic user reads it through the `outpost` group, made by sysusers.
    let groups = std::fs::read_to_string(root.path("/etc/group")).unwrap();
    let outpost_gid = groups.lines().find_map(|l| l.strip_prefix("outpost:x:")).map(|rest| rest.split(':').next());
    let outpost_gid: u32 =
        outpost_gid.flatten().unwrap_or_else(|| panic!("no outpost group: {groups}")).parse().unwrap();
    let config_gid =
        std::os::unix::fs::MetadataExt::gid(&std::fs::metadata(root.path("/etc/outpost/outpostd.toml")).unwrap());
    assert_eq!(config_gid, outpost_gid);
    let unit_text = std::fs::read_to_string(root.path("/usr/lib/systemd/system/outpostd.service")).unwrap();
    assert!(unit_text.contains("\nSupplementaryGroups=video audio outpost\n"));
    let unit = std::fs::read(root.path("/usr/lib/systemd/system/outpostd.service")).unwrap();
    assert_eq!(unit, std::fs::read(repo().join("systemd/outpostd.service")).unwrap());
    let config = std::fs::read(root.path("/etc/outpost/outpostd.toml")).unwrap();
    assert_eq!(config, std::fs::read(repo().join("deploy/debian/outpostd.toml")).unwrap());
    for example in ["demo", "disaster-kit", "sensor-station", "reference"] {
        assert!(root.path(&format!("/usr/share/doc/outpostd/examples/{example}.toml")).is_file(), "{example}");
    }
    assert!(root.path("/usr/share/doc/outpostd/copyright").is_file());
    depends_covers_the_binary(&package, &root.path("/usr/bin/outpostd"));
    // The config is a conffile: an upgrade never overwrites the station's edits.
    assert!(root.query("${Conffiles}").contains("/etc/outpost/outpostd.toml"));
    assert_eq!(root.query("${Status}"), "install ok installed");

    // The state directory, laid out as systemd's DynamicUser= wants it, before the first start.
    let state = root.path("/var/lib/outpost");
    assert_eq!(std::fs::read_link(&state).unwrap(), Path::new("private/outpost"));
    assert_eq!(root.mode("/var/lib/private"), 0o700);
    assert!(state.join(".").is_dir());

    // Installed into a folder, the config's paths are that system's: not checked, not enabled,
    // and the post-install says how to enable it there.
    let wanted = root.path("/etc/systemd/system/multi-user.target.wants/outpostd.service");
    assert!(wanted.symlink_metadata().is_err());
    let expected = format!("outpostd: installed under {}; the service is not enabled there", root.dir.path().display());
    assert!(installed.contains(&expected), "{installed}");
    let root_arg = format!("--root={}", root.dir.path().display());
    run(Command::new("systemctl").args([&root_arg, "enable", "outpostd.service"]));
    assert_eq!(std::fs::read_link(&wanted).unwrap(), Path::new("/usr/lib/systemd/system/outpostd.service"));

    // Installing again keeps the station's edits to its config.
    let edited = String::from_utf8(config).unwrap().replace("fps = 5", "fps = 2");
    std::fs::write(root.path("/etc/outpost/outpostd.toml"), &edited).unwrap();
    root.dpkg(&["--install", package.to_str().unwrap()]);
    let kept = std::fs::read_to_string(root.path("/etc/outpost/outpostd.toml")).unwrap();
    assert_eq!(kept, edited, "reinstalling replaced the station's config");
    assert_eq!(root.mode("/etc/outpost/outpostd.toml"), 0o640);

    root.verify_unit();

    // Remove keeps the config and what the station holds (its outbox, its models); purge does not.
    std::fs::create_dir_all(state.join("models")).unwrap();
    root.dpkg(&["--remove", "outpostd"]);
    assert!(!root.path("/usr/bin/outpostd").exists());
    assert!(root.path("/etc/outpost/outpostd.toml").exists());
    assert!(state.join("models").is_dir());
    root.dpkg(&["--purge", "outpostd"]);
    assert!(!root.path("/etc/outpost/outpostd.toml").exists());
    assert!(root.path("/var/lib/outpost").symlink_metadata().is_err());
    assert!(!root.path("/var/lib/private/outpost").exists());
    assert!(wanted.symlink_metadata().is_err(), "purge left the service enabled");
}

/// A station to deploy to: this machine's own system seen through an overlay, in a mount namespace
/// of its own, with sshd started inside it on a free loopback port. Whatever the deploy installs
/// (the package through apt-get, the config, the bundle) lands in the overlay's upper directory,
/// never on this machine. No systemd runs there, so the service is enabled for the next boot.
struct Station {
    dir: tempfile::TempDir,
    sshd: std::process::Child,
    port: u16,
}

impl Station {
    fn start() -> Station {
        let dir = tempfile::tempdir().unwrap();
        let path = |p: &str| dir.path().join(p);
        for sub in ["upper", "work", "merged"] {
            std::fs::create_dir(path(sub)).unwrap();
        }
        run(Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-f"]).arg(path("host_key")));
        run(Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-f"]).arg(path("client_key")));
        std::fs::copy(path("client_key.pub"), path("authorized_keys")).unwrap();
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let config = format!(
            "ListenAddress 127.0.0.1:{port}\nHostKey {}\nAuthorizedKeysFile {}\nPermitRootLogin prohibit-password\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nPidFile none\n\
             Subsystem sftp internal-sftp\n",
            path("host_key").display(),
            path("authorized_keys").display(),
        );
        std::fs::write(path("sshd_config"), config).unwrap();
        let merged = path("merged");
        let script = format!(
            "set -e\n\
             mount -t overlay overlay -o lowerdir=/,upperdir={upper},workdir={work} {merged}\n\
             mount -t proc proc {merged}/proc\n\
             mount --rbind /dev {merged}/dev\n\
             mount --rbind /tmp {merged}/tmp\n\
             mount -t tmpfs tmpfs {merged}/run\n\
             mkdir -p {merged}/run/sshd\n\
             exec chroot {merged} /usr/sbin/sshd -D -e -f {config}",
            upper = path("upper").display(),
            work = path("work").display(),
            merged = merged.display(),
            config = path("sshd_config").display(),
        );
        let sshd = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c", &script])
            .stderr(std::fs::File::create(path("sshd.log")).unwrap())
            .spawn()
            .expect("unshare (util-linux) starts the station's sshd");
        let station = Station { dir, sshd, port };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(std::time::Instant::now() < deadline, "sshd did not start:\n{}", station.sshd_log());
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        station
    }

    fn sshd_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sshd.log")).unwrap_or_default()
    }

    /// A path on the station, as far as the deploy changed it (the overlay's upper directory).
    fn changed(&self, inside: &str) -> PathBuf {
        self.dir.path().join("upper").join(inside.trim_start_matches('/'))
    }

    /// How ssh reaches this station: its port and key, this machine's ssh config left out.
    fn ssh_options(&self) -> Vec<String> {
        let key = self.dir.path().join("client_key");
        ["-p", &self.port.to_string(), "-i", key.to_str().unwrap()]
            .into_iter()
            .chain(["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR"])
            .chain(["-o", "IdentitiesOnly=yes"])
            .map(String::from)
            .collect()
    }

    /// A command run on the station as root, through ssh; what it printed.
    fn ssh(&self, command: &str) -> String {
        said(&run(Command::new("ssh")
            .args(["-F", "/dev/null"])
            .args(self.ssh_options())
            .arg("root@127.0.0.1")
            .arg(command)))
    }

    /// `deploy/deploy.sh` to this station, as root; what it printed, and whether it succeeded.
    fn deploy(&self, package: &Path, config: &Path, bundle: &Path) -> (bool, String) {
        let output = Command::new("bash")
            .arg(repo().join("deploy/deploy.sh"))
            .args(self.ssh_options())
            .arg("root@127.0.0.1")
            .arg("--package")
            .arg(package)
            .arg("--config")
            .arg(config)
            .arg("--bundle")
            .arg(bundle)
            .output()
            .unwrap();
        let said = said(&output);
        eprintln!("deploy.sh said:\n{said}");
        (output.status.success(), said)
    }
}

impl Drop for Station {
    fn drop(&mut self) {
        // sshd is the namespace's last process: with it gone, the overlay is unmounted.
        let _ = self.sshd.kill();
        let _ = self.sshd.wait();
    }
}

#[test]
fn deploy_installs_package_config_and_bundle_over_ssh_and_refuses_a_damaged_bundle_or_a_bad_config() {
    if not_root("deploy") {
        return;
    }
    let out = tempfile::tempdir().unwrap();
    let package = package_of_this_build();
    let station = Station::start();

    // The station's config names the bundle where the deploy puts it.
    let bundle = out.path().join("gemma4-tiny");
    run(Command::new("cp").arg("-r").arg(repo().join("daemon/tests/fixtures/gemma4-tiny")).arg(&bundle));
    let packaged = std::fs::read_to_string(repo().join("deploy/debian/outpostd.toml")).unwrap();
    let text = packaged
        .replace("/var/lib/outpost/models/gemma4-e2b", "/var/lib/outpost/models/gemma4-tiny")
        .replace("# id = \"station-1\"", "id = \"deployed-1\"");
    let config = out.path().join("station.toml");
    std::fs::write(&config, &text).unwrap();

    // The package alone, as `apt install` puts it on a station: the config it brings names a
    // bundle that is not there, so the service is not enabled, and the post-install says why.
    let installed = station.ssh(&format!("apt-get install -y -qq {}", package.display()));
    assert!(installed.contains("outpostd: /etc/outpost/outpostd.toml is not ready:"), "{installed}");
    assert!(installed.contains("model.bundle: /var/lib/outpost/models/gemma4-e2b: no manifest.json"), "{installed}");
    assert!(installed.contains("the config has 1 problem(s)"), "only the bundle is missing:\n{installed}");
    assert!(installed.contains("outpostd: the service was not enabled"), "{installed}");
    assert!(installed.contains("sudo systemctl enable --now outpostd"), "{installed}");
    let wanted = station.changed("/etc/systemd/system/multi-user.target.wants/outpostd.service");
    assert!(wanted.symlink_metadata().is_err());

    let (ok, said) = station.deploy(&package, &config, &bundle);
    assert!(ok, "{said}\nsshd:\n{}", station.sshd_log());
    assert!(said.contains("what arrived is intact and the config passes; installing outpostd 0.1.0"), "{said}");
    assert!(said.contains("installed and enabled; systemd is not running here"), "{said}");
    let status = std::fs::read_to_string(station.changed("/var/lib/dpkg/status")).unwrap();
    let entry = status.split("\n\n").find(|e| e.starts_with("Package: outpostd\n")).unwrap();
    assert!(entry.contains("Status: install ok installed"), "{entry}");
    assert_eq!(std::fs::read_to_string(station.changed("/etc/outpost/outpostd.toml")).unwrap(), text);
    let models = station.changed("/var/lib/private/outpost/models/gemma4-tiny");
    run(Command::new("diff").arg("--recursive").arg(&bundle).arg(&models));
    assert!(wanted.symlink_metadata().is_ok(), "the deploy did not enable the service");
    let staging = std::fs::read_dir(station.changed("/var/tmp")).unwrap();
    let left: Vec<_> =
        staging.map(|e| e.unwrap().file_name()).filter(|n| n.to_string_lossy().contains("outpost")).collect();
    assert!(left.is_empty(), "the staging directory was left behind: {left:?}");
    // The station's copy, told apart from the one sent, to see which one a refused deploy keeps.
    std::fs::write(models.join("deployed-first"), "").unwrap();

    // One byte of the model changed on the way: refused before anything is installed.
    let decoder = bundle.join("decoder.onnx");
    let mut bytes = std::fs::read(&decoder).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    std::fs::write(&decoder, bytes).unwrap();
    let changed_config = text.replace("id = \"deployed-1\"", "id = \"deployed-2\"");
    std::fs::write(&config, &changed_config).unwrap();
    let (ok, said) = station.deploy(&package, &config, &bundle);
    assert!(!ok, "a damaged bundle was accepted:\n{said}");
    assert!(said.contains("the bundle gemma4-tiny does not match its manifest; nothing was changed"), "{said}");
    assert!(said.contains("decoder.onnx"), "the file at fault is named:\n{said}");
    assert_eq!(std::fs::read_to_string(station.changed("/etc/outpost/outpostd.toml")).unwrap(), text);
    assert_ne!(std::fs::read(models.join("decoder.onnx")).unwrap(), std::fs::read(&decoder).unwrap());

    // A sound bundle but a config the daemon refuses: the station keeps its config and bundle.
    run(Command::new("cp").arg(repo().join("daemon/tests/fixtures/gemma4-tiny/decoder.onnx")).arg(&decoder));
    std::fs::write(&config, changed_config.replace("fps = 5", "fps = 0")).unwrap();
    let (ok, said) = station.deploy(&package, &config, &bundle);
    assert!(!ok, "a bad config was accepted:\n{said}");
    assert!(said.contains("camera.fps"), "{said}");
    assert!(said.contains("the config was refused (above); nothing was changed"), "{said}");
    assert_eq!(std::fs::read_to_string(station.changed("/etc/outpost/outpostd.toml")).unwrap(), text);
    assert!(models.join("deployed-first").is_file(), "the station's bundle was not put back");
    assert!(!station.changed("/etc/outpost/outpostd.toml.new").exists());
}
