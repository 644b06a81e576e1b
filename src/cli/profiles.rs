//! Which profile directory `sim` and `probe` read, and one profile from it.
//!
//! `--profiles-dir DIR` if given; otherwise the first directory of `./firmware-profiles`
//! and the installed profiles (`/usr/share/citygate/firmware-profiles`). A directory that
//! is missing is reported as such, naming the places looked in (exit 64), not as an
//! invalid configuration.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::CliError;
use crate::profile::{Profile, ProfileSet};

/// The directory to read: `arg`, or the first default place that exists.
fn resolve(arg: Option<&Path>) -> Result<PathBuf, CliError> {
    if let Some(dir) = arg {
        if dir.is_dir() {
            return Ok(dir.to_path_buf());
        }
        return Err(CliError::Usage(format!(
            "--profiles-dir {}: no such directory of device profiles",
            dir.display()
        )));
    }
    let (dir, looked_in) = crate::config::default_profiles_dir(Path::new("."));
    if dir.is_dir() {
        return Ok(dir);
    }
    Err(CliError::Usage(format!(
        "no profile directory: --profiles-dir not given and none in {}; give --profiles-dir DIR",
        looked_in
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )))
}

/// Profile `name` from the directory `arg` names (see the module docs).
pub(crate) fn load_profile(arg: Option<&Path>, name: &str) -> Result<Arc<Profile>, CliError> {
    let dir = resolve(arg)?;
    let profiles = ProfileSet::load_dir(&dir).map_err(|e| CliError::Config(e.into()))?;
    profiles.get(name).cloned().ok_or_else(|| {
        CliError::Usage(format!(
            "no profile {name:?} in {}; valid: {}",
            dir.display(),
            profiles.names().collect::<Vec<_>>().join(", ")
        ))
    })
}
