//! `citygate keys tls`: a CA, the broker's and every client's certificate, and a ready
//! mosquitto config with its access rules, all or nothing.
//!
//! Everything is written into a staging folder first (a sibling of DIR when DIR does not
//! exist yet, a hidden folder inside it otherwise) and moved into place only when every file
//! is written and owned as it should be; any failure removes the staging folder, so a bad
//! `--client` leaves nothing behind. Run as root where the broker's user exists
//! (`--broker-user`, default `mosquitto`), the broker key goes to that user (0600) and the two
//! `.conf` files to its group (0640), so the broker can read them after dropping privileges;
//! otherwise the exact commands are printed.

use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use crate::cli::CliError;
use crate::mqtt::acl::{self, BrokerRoles};
use crate::mqtt::certs::check_client_name;
use crate::mqtt::CertAuthority;
use crate::reading::GatewayId;

const ACL_FILE: &str = "mosquitto-acl.conf";
const CONF_FILE: &str = "mosquitto.conf";
const BROKER_KEY_FILE: &str = "broker.key";

/// What `citygate keys tls` issues.
#[derive(Debug, Clone, clap::Args)]
pub struct TlsIssue {
    /// Directory to write ca.pem, broker.pem/.key, client-ID.pem/.key and the mosquitto
    /// files into.
    #[arg(long)]
    pub dir: PathBuf,
    /// DNS name or IP address the broker is reached by (repeatable).
    #[arg(long = "server", required = true)]
    pub servers: Vec<String>,
    /// Gateway id: may publish only its own batches and read only its own acks (repeatable).
    #[arg(long = "gateway", num_args = 1..)]
    pub gateways: Vec<String>,
    /// Hub name: reads every gateway's batches and publishes acks (repeatable).
    #[arg(long = "hub", num_args = 1..)]
    pub hubs: Vec<String>,
    /// Other client (meter, simulator): anything outside citygate/# (repeatable).
    #[arg(long = "client", num_args = 1..)]
    pub clients: Vec<String>,
    /// Topic filter of MQTT meters that gateways may read on this broker (repeatable).
    #[arg(long = "meter-topic")]
    pub meter_topics: Vec<String>,
    /// Port of the listener in the generated mosquitto.conf.
    #[arg(long, default_value_t = 8883)]
    pub port: u16,
    /// Address the listener binds to (default: every interface).
    #[arg(long)]
    pub bind: Option<IpAddr>,
    /// The user the broker reads its key as: Debian's mosquitto runs as `mosquitto`; the
    /// hub's embedded broker as the hub's user (e.g. `citygate`).
    #[arg(long, default_value = "mosquitto")]
    pub broker_user: String,
    /// Replace an existing ca.pem in DIR.
    #[arg(long)]
    pub force: bool,
}

fn usage(e: impl std::fmt::Display) -> CliError {
    CliError::Usage(e.to_string())
}

/// Checks every argument before anything is written.
fn validate(issue: &TlsIssue) -> Result<Vec<GatewayId>, CliError> {
    let ca = issue.dir.join("ca.pem");
    if ca.exists() && !issue.force {
        return Err(CliError::Usage(format!(
            "{} already exists; certificates issued by it would stop verifying. Use --force to replace it",
            ca.display()
        )));
    }
    if issue.gateways.is_empty() && issue.hubs.is_empty() && issue.clients.is_empty() {
        return Err(usage(
            "name at least one --gateway, --hub or --client to issue a certificate for",
        ));
    }
    let mut seen = std::collections::BTreeSet::new();
    let roles = [
        ("--gateway", &issue.gateways),
        ("--hub", &issue.hubs),
        ("--client", &issue.clients),
    ];
    for (flag, names) in roles {
        for name in names {
            if !seen.insert(name) {
                return Err(CliError::Usage(format!(
                    "{name} is named twice; one certificate (one CN, one broker identity) per name"
                )));
            }
            check_client_name(name).map_err(|e| usage(format!("{flag} {name}: {e}")))?;
        }
    }
    let mut gateways = Vec::new();
    for g in &issue.gateways {
        gateways
            .push(GatewayId::new(g.as_str()).map_err(|e| usage(format!("--gateway {g}: {e}")))?);
    }
    for t in &issue.meter_topics {
        acl::check_meter_topic(t).map_err(CliError::Usage)?;
    }
    Ok(gateways)
}

/// A staging folder removed on drop unless committed.
#[derive(Debug)]
struct Staging {
    path: PathBuf,
    committed: bool,
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

impl Staging {
    fn create(dir: &Path) -> Result<Staging, CliError> {
        let pid = std::process::id();
        let path = if dir.is_dir() {
            dir.join(format!(".citygate-tls-{pid}"))
        } else {
            let name = dir
                .file_name()
                .ok_or_else(|| usage(format!("--dir {}: name a folder", dir.display())))?;
            let parent = dir
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            fs::create_dir_all(parent).map_err(|e| usage(format!("{}: {e}", parent.display())))?;
            parent.join(format!(".{}.citygate-tls-{pid}", name.to_string_lossy()))
        };
        let _ = fs::remove_dir_all(&path);
        fs::create_dir(&path).map_err(|e| usage(format!("{}: {e}", path.display())))?;
        Ok(Staging {
            path,
            committed: false,
        })
    }

    /// Moves every staged file into `dir` (or the folder itself, when `dir` is new).
    fn commit(mut self, dir: &Path) -> Result<(), CliError> {
        fn io(p: &Path) -> impl FnOnce(std::io::Error) -> CliError + '_ {
            move |e| CliError::Runtime(format!("{}: {e}", p.display()))
        }
        if dir.is_dir() {
            for entry in fs::read_dir(&self.path).map_err(io(&self.path))? {
                let entry = entry.map_err(io(&self.path))?;
                let to = dir.join(entry.file_name());
                fs::rename(entry.path(), &to).map_err(io(&to))?;
            }
            fs::remove_dir(&self.path).map_err(io(&self.path))?;
        } else {
            fs::rename(&self.path, dir).map_err(io(dir))?;
        }
        self.committed = true;
        Ok(())
    }
}

/// `citygate keys tls --dir DIR --server NAME… [--gateway ID…] [--hub NAME…] [--client ID…]
/// [--meter-topic FILTER…] [--port N] [--bind ADDR]`
pub(super) fn keys_tls(issue: &TlsIssue) -> Result<(), CliError> {
    let gateways = validate(issue)?;
    let dir = issue.dir.as_path();
    let abs = std::path::absolute(dir).unwrap_or_else(|_| dir.to_owned());
    let staging = Staging::create(dir)?;
    let stage = staging.path.as_path();
    let (mut names, mut ips) = (Vec::new(), Vec::new());
    for s in &issue.servers {
        match s.parse::<IpAddr>() {
            Ok(ip) => ips.push(ip),
            Err(_) => names.push(s.as_str()),
        }
    }
    let ca = CertAuthority::generate(stage, "citygate CA").map_err(usage)?;
    ca.issue_server("broker", &names, &ips)
        .map_err(|e| match e {
            crate::mqtt::TlsError::InvalidName(n) => usage(format!("--server {n}: not a DNS name")),
            e => usage(e),
        })?;
    let roles = [
        ("gateway", &issue.gateways),
        ("hub", &issue.hubs),
        ("client", &issue.clients),
    ];
    for (_, names) in roles {
        for c in names {
            ca.issue_client(c).map_err(usage)?;
        }
    }
    let broker_roles = BrokerRoles {
        gateways,
        hubs: issue.hubs.clone(),
        clients: issue.clients.clone(),
        meter_topics: issue.meter_topics.clone(),
    };
    let write = |name: &str, text: String| {
        let path = stage.join(name);
        fs::write(&path, text).map_err(|e| usage(format!("cannot write {}: {e}", path.display())))
    };
    write(ACL_FILE, acl::mosquitto_acl(&broker_roles))?;
    write(CONF_FILE, acl::mosquitto_conf(&abs, issue.port, issue.bind))?;
    let access = broker_access(stage, &issue.broker_user)?;
    staging.commit(dir)?;

    let at = |name: &str| abs.join(name).display().to_string();
    println!(
        "CA certificate        {} (give to every gateway, hub and the broker)",
        at("ca.pem")
    );
    println!(
        "broker certificate    {} + {} (0600) for {}",
        at("broker.pem"),
        at(BROKER_KEY_FILE),
        issue.servers.join(", ")
    );
    for (role, names) in roles {
        for c in names {
            println!(
                "{role:<8}certificate {} + {} (0600) for {c}",
                at(&format!("client-{c}.pem")),
                at(&format!("client-{c}.key"))
            );
        }
    }
    println!(
        "mosquitto             {} (listener on port {}, ready for `mosquitto -c`) and {} (access rules per certificate)",
        at(CONF_FILE),
        issue.port,
        at(ACL_FILE)
    );
    let user = &issue.broker_user;
    match access {
        BrokerAccess::Granted(broker) => {
            println!(
                "                      {} is owned by {user} (0600); the .conf files are group {user} (0640)",
                at(BROKER_KEY_FILE)
            );
            for closed in abs.ancestors() {
                if let Some(fix) = entry_refused(closed, &broker) {
                    println!("warning: {user} cannot enter {}: {fix}", closed.display());
                }
            }
        }
        BrokerAccess::Commands(why) => {
            println!("{why} Let the broker read its files (as root):");
            println!(
                "  chown {user}:{user} {key} && chmod 0600 {key}",
                key = at(BROKER_KEY_FILE)
            );
            println!(
                "  chown root:{user} {acl} {conf} && chmod 0640 {acl} {conf}",
                acl = at(ACL_FILE),
                conf = at(CONF_FILE)
            );
        }
    }
    println!(
        "The CA's private key was not written: issue further certificates by running this again \
         (a new CA) or with your own PKI."
    );
    Ok(())
}

/// Whether users other than the owner and group may pass through folder `dir`.
/// Why `user` may not pass through `dir` (search permission as its owner, as a member of its
/// group, or as anyone else), with what would let it; `None` if it may (or `dir` cannot be
/// read: nothing to tell).
fn entry_refused(dir: &Path, user: &nix::unistd::User) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let meta = fs::metadata(dir).ok()?;
    let mode = meta.mode();
    let name = &user.name;
    if user.uid.is_root() {
        return None;
    }
    if meta.uid() == user.uid.as_raw() {
        return (mode & 0o100 == 0).then(|| format!("its owner {name} has no x on it"));
    }
    let group = nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(meta.gid()))
        .ok()
        .flatten();
    let member = user.gid.as_raw() == meta.gid()
        || group
            .as_ref()
            .is_some_and(|g| g.mem.iter().any(|m| m == name));
    if member {
        return (mode & 0o010 == 0).then(|| "its group has no x on it".to_owned());
    }
    if mode & 0o001 != 0 {
        return None;
    }
    Some(match group {
        Some(g) if mode & 0o010 != 0 => format!(
            "add it to the folder's group ({} is not a member): adduser {name} {}",
            name, g.name
        ),
        _ => "no x for others: keep DIR under a folder it can enter, e.g. /etc/citygate/tls"
            .to_owned(),
    })
}

/// Whether the broker's user could be given its files here.
#[derive(Debug)]
enum BrokerAccess {
    /// The files are the broker user's (given).
    Granted(nix::unistd::User),
    /// Why not, to print before the commands that do it.
    Commands(String),
}

/// As root, where `user` exists: the broker key to that user (0600), the `.conf` files to its
/// group (0640), in the staging folder.
fn broker_access(stage: &Path, user_name: &str) -> Result<BrokerAccess, CliError> {
    use std::os::unix::fs::PermissionsExt;
    if !nix::unistd::geteuid().is_root() {
        return Ok(BrokerAccess::Commands(
            "Not run as root, so file owners are unchanged.".into(),
        ));
    }
    let user = match nix::unistd::User::from_name(user_name) {
        Ok(Some(user)) => user,
        _ => {
            return Ok(BrokerAccess::Commands(format!(
                "There is no user `{user_name}` here; if the broker runs as another user, name it with --broker-user."
            )))
        }
    };
    let (uid, gid) = (user.uid.as_raw(), user.gid.as_raw());
    let grant = |name: &str, owner: Option<u32>, mode: u32| {
        let path = stage.join(name);
        std::os::unix::fs::chown(&path, owner, Some(gid))
            .and_then(|()| fs::set_permissions(&path, fs::Permissions::from_mode(mode)))
            .map_err(|e| CliError::Runtime(format!("{}: {e}", path.display())))
    };
    grant(BROKER_KEY_FILE, Some(uid), 0o600)?;
    grant(ACL_FILE, Some(0), 0o640)?;
    grant(CONF_FILE, Some(0), 0o640)?;
    Ok(BrokerAccess::Granted(user))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use nix::unistd::{Gid, Uid, User};

    use super::*;

    fn user(uid: u32, gid: u32) -> User {
        User {
            name: "brokerd".into(),
            passwd: Default::default(),
            uid: Uid::from_raw(uid),
            gid: Gid::from_raw(gid),
            gecos: Default::default(),
            dir: "/nonexistent".into(),
            shell: "/usr/sbin/nologin".into(),
        }
    }

    /// issue 12 item 4: the packaged layout (`/etc/citygate` root:citygate 0750) is open to a
    /// broker user in the group, and the warning for one outside it names the `adduser`
    /// command instead of telling the operator to move the folder.
    #[test]
    fn the_broker_user_may_enter_through_its_group_and_is_told_how_otherwise() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: chown needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let set = |uid: u32, gid: u32, mode: u32| {
            std::os::unix::fs::chown(d, Some(uid), Some(gid)).unwrap();
            fs::set_permissions(d, fs::Permissions::from_mode(mode)).unwrap();
        };
        // A group with a name (root's), the broker user not in it.
        set(0, 0, 0o750);
        let outsider = user(4242, 4242);
        let fix = entry_refused(d, &outsider).expect("refused");
        assert!(fix.contains("adduser brokerd root"), "{fix}");
        // In the group (its primary group here): may enter.
        set(0, 4242, 0o750);
        assert_eq!(entry_refused(d, &outsider), None);
        set(0, 4242, 0o700);
        assert!(entry_refused(d, &outsider)
            .unwrap()
            .contains("group has no x"));
        // Others may enter; the owner needs its own x.
        set(0, 0, 0o751);
        assert_eq!(entry_refused(d, &outsider), None);
        set(4242, 0, 0o651);
        assert!(entry_refused(d, &outsider).unwrap().contains("owner"));
        // Neither group nor others: no membership helps.
        set(0, 0, 0o700);
        assert!(entry_refused(d, &outsider)
            .unwrap()
            .contains("no x for others"));
        assert_eq!(entry_refused(d, &user(0, 0)), None);
    }
}
