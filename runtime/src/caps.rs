//! `process.capabilities` → the five capability sets of the container process, with the `caps`
//! crate.
//!
//! Names are resolved in [`CapSets::from_spec`]; capabilities the running kernel does not have
//! (index above `/proc/sys/kernel/cap_last_cap`) are left out with a warning, as runc does.
//! Applying them is split in two because the bounding set needs CAP_SETPCAP, so it is reduced
//! before the uid change ([`CapSets::drop_bounding`]), and the other sets after it
//! ([`CapSets::apply`]).

use ::caps::{CapSet, Capability as HostCap, CapsHashSet};
use oci_spec::runtime::{Capabilities, Capability, LinuxCapabilities};
use twinbox_exit::ExitCode;

/// Errors from resolving or applying capabilities.
#[derive(Debug, thiserror::Error)]
pub enum CapsError {
    #[error("capability {0} unknown")]
    Unknown(String),
    #[error("effective capability {0} is not permitted")]
    EffectiveNotPermitted(HostCap),
    #[error("drop {cap} from the bounding set")]
    Bounding {
        cap: HostCap,
        #[source]
        source: ::caps::errors::CapsError,
    },
    #[error("set the {set} capabilities")]
    Set {
        set: &'static str,
        #[source]
        source: ::caps::errors::CapsError,
    },
    #[error("clear the ambient capabilities")]
    ClearAmbient(#[source] ::caps::errors::CapsError),
    #[error("raise ambient capability {cap}")]
    Ambient {
        cap: HostCap,
        #[source]
        source: ::caps::errors::CapsError,
    },
}

impl ExitCode for CapsError {
    fn exit_code(&self) -> i32 {
        match self {
            CapsError::Unknown(_) | CapsError::EffectiveNotPermitted(_) => twinbox_exit::USER_ERROR,
            CapsError::Bounding { .. }
            | CapsError::Set { .. }
            | CapsError::ClearAmbient(_)
            | CapsError::Ambient { .. } => twinbox_exit::INTERNAL,
        }
    }
}

/// Parse a capability name as the OCI spec and runc's `--cap` take it: `CAP_NET_ADMIN`, also
/// without the prefix or in lower case.
pub fn parse(name: &str) -> Result<Capability, CapsError> {
    serde_json::from_value(serde_json::Value::String(name.to_owned())).map_err(|_| CapsError::Unknown(name.to_owned()))
}

/// The `caps` crate's value for an OCI capability.
pub fn to_host(cap: Capability) -> Result<HostCap, CapsError> {
    // The OCI type serialises to the kernel's name ("CAP_NET_ADMIN"), which is what the caps
    // crate parses.
    let name = match serde_json::to_value(cap) {
        Ok(serde_json::Value::String(name)) => name,
        _ => format!("{cap:?}"),
    };
    name.parse().map_err(|_| CapsError::Unknown(name))
}

/// The resolved capability sets of a process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapSets {
    /// Capabilities of the running kernel that are not in the bounding set, by index.
    drop_bounding: Vec<HostCap>,
    effective: CapsHashSet,
    permitted: CapsHashSet,
    inheritable: CapsHashSet,
    /// Ambient capabilities, by index; only those also permitted and inheritable.
    ambient: Vec<HostCap>,
}

impl CapSets {
    /// Resolve the spec's sets; a missing set is empty.
    pub fn from_spec(spec: &LinuxCapabilities) -> Result<Self, CapsError> {
        let supported =
            ::caps::runtime::procfs_all_supported(None).unwrap_or_else(|_| ::caps::runtime::thread_all_supported());
        let resolve = |set: &Option<Capabilities>, name: &str| -> Result<CapsHashSet, CapsError> {
            let mut out = CapsHashSet::new();
            for cap in set.iter().flatten() {
                let host = to_host(*cap)?;
                if supported.contains(&host) {
                    out.insert(host);
                } else {
                    tracing::warn!(%host, set = name, "capability not supported by the kernel, ignored");
                }
            }
            Ok(out)
        };
        let bounding = resolve(spec.bounding(), "bounding")?;
        let effective = resolve(spec.effective(), "effective")?;
        let permitted = resolve(spec.permitted(), "permitted")?;
        let inheritable = resolve(spec.inheritable(), "inheritable")?;
        // capset(2) refuses an effective set that is not within the permitted one.
        if let Some(cap) = effective.difference(&permitted).min_by_key(|c| c.index()) {
            return Err(CapsError::EffectiveNotPermitted(*cap));
        }
        let mut ambient = Vec::new();
        for cap in resolve(spec.ambient(), "ambient")? {
            if permitted.contains(&cap) && inheritable.contains(&cap) {
                ambient.push(cap);
            } else {
                // The kernel only raises an ambient capability that is permitted and inheritable;
                // runc warns and goes on.
                tracing::debug!(%cap, "ambient capability not permitted and inheritable, ignored");
            }
        }
        ambient.sort_by_key(HostCap::index);
        let mut drop_bounding: Vec<HostCap> = supported.difference(&bounding).copied().collect();
        drop_bounding.sort_by_key(HostCap::index);
        Ok(Self { drop_bounding, effective, permitted, inheritable, ambient })
    }

    /// Reduce the bounding set to the spec's. Needs CAP_SETPCAP. Allocation free.
    pub fn drop_bounding(&self) -> Result<(), CapsError> {
        for &cap in &self.drop_bounding {
            ::caps::drop(None, CapSet::Bounding, cap).map_err(|source| CapsError::Bounding { cap, source })?;
        }
        Ok(())
    }

    /// Set the inheritable, effective and permitted sets of the calling thread exactly to the
    /// spec's, then its ambient set. Allocation free, except on error.
    ///
    /// The order keeps every capset(2) call valid: the inheritable set first, while the
    /// permitted set is still whole; the effective set next, within the whole permitted set;
    /// the permitted set last, which must contain the new effective set.
    pub fn apply(&self) -> Result<(), CapsError> {
        for (cset, set, value) in [
            (CapSet::Inheritable, "inheritable", &self.inheritable),
            (CapSet::Effective, "effective", &self.effective),
            (CapSet::Permitted, "permitted", &self.permitted),
        ] {
            ::caps::set(None, cset, value).map_err(|source| CapsError::Set { set, source })?;
        }
        match ::caps::clear(None, CapSet::Ambient) {
            Ok(()) => {}
            // A kernel without ambient capabilities (before 4.3) is fine when none are asked for.
            Err(_) if self.ambient.is_empty() => {}
            Err(source) => return Err(CapsError::ClearAmbient(source)),
        }
        for &cap in &self.ambient {
            ::caps::raise(None, CapSet::Ambient, cap).map_err(|source| CapsError::Ambient { cap, source })?;
        }
        Ok(())
    }

    /// Capabilities [`drop_bounding`](Self::drop_bounding) removes.
    pub fn dropped_from_bounding(&self) -> &[HostCap] {
        &self.drop_bounding
    }

    pub fn effective(&self) -> &CapsHashSet {
        &self.effective
    }

    pub fn permitted(&self) -> &CapsHashSet {
        &self.permitted
    }

    pub fn inheritable(&self) -> &CapsHashSet {
        &self.inheritable
    }

    /// The ambient capabilities that will be raised.
    pub fn ambient(&self) -> &[HostCap] {
        &self.ambient
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(names: &[&str]) -> Capabilities {
        names.iter().map(|n| parse(n).unwrap()).collect()
    }

    #[test]
    fn parse_names() {
        assert_eq!(parse("CAP_NET_ADMIN").unwrap(), Capability::NetAdmin);
        assert_eq!(parse("net_admin").unwrap(), Capability::NetAdmin);
        assert_eq!(parse("CAP_FOO").unwrap_err().to_string(), "capability CAP_FOO unknown");
        assert_eq!(parse("").unwrap_err().to_string(), "capability  unknown");
    }

    #[test]
    fn every_oci_capability_has_a_host_value() {
        for host in ::caps::all() {
            let oci = parse(&host.to_string()).unwrap();
            assert_eq!(to_host(oci).unwrap(), host);
        }
    }

    #[test]
    fn sets_from_spec() {
        let mut spec = LinuxCapabilities::default();
        spec.set_bounding(Some(caps(&["CAP_CHOWN", "CAP_NET_BIND_SERVICE"])));
        spec.set_effective(Some(caps(&["CAP_CHOWN"])));
        spec.set_permitted(Some(caps(&["CAP_CHOWN", "CAP_NET_BIND_SERVICE"])));
        spec.set_inheritable(Some(caps(&["CAP_NET_BIND_SERVICE", "CAP_KILL"])));
        spec.set_ambient(Some(caps(&["CAP_NET_BIND_SERVICE", "CAP_CHOWN"])));
        let sets = CapSets::from_spec(&spec).unwrap();
        assert_eq!(sets.ambient(), &[HostCap::CAP_NET_BIND_SERVICE]);
        assert!(sets.effective().contains(&HostCap::CAP_CHOWN));
        assert_eq!(sets.effective().len(), 1);
        assert!(!sets.dropped_from_bounding().contains(&HostCap::CAP_CHOWN));
        assert!(sets.dropped_from_bounding().contains(&HostCap::CAP_SYS_ADMIN));
        let indices: Vec<u8> = sets.dropped_from_bounding().iter().map(|c| c.index()).collect();
        assert!(indices.windows(2).all(|w| w[0] < w[1]));

        let empty = LinuxCapabilities::default();
        let mut none = empty.clone();
        none.set_bounding(None);
        none.set_effective(None);
        none.set_permitted(None);
        none.set_inheritable(None);
        none.set_ambient(None);
        let sets = CapSets::from_spec(&none).unwrap();
        assert!(sets.effective().is_empty() && sets.permitted().is_empty());
        assert!(sets.dropped_from_bounding().contains(&HostCap::CAP_CHOWN));

        let mut bad = none;
        bad.set_effective(Some(caps(&["CAP_NET_ADMIN", "CAP_CHOWN"])));
        bad.set_permitted(Some(caps(&["CAP_CHOWN"])));
        assert_eq!(
            CapSets::from_spec(&bad).unwrap_err().to_string(),
            "effective capability CAP_NET_ADMIN is not permitted"
        );
    }
}
