//! Test hooks for simulations and tests, gathered in [`TestHooks`] (the one
//! field [`ParticipantConfig::hooks`](crate::ParticipantConfig::hooks)):
//!
//! - scheduled dropouts: a participant that crashes at a chosen point of a
//!   chosen round, the way a machine losing power or a killed process would:
//!   no goodbye message, no connection close. The crash happens just
//!   *before* the participant sends the message of the named stage (or as
//!   local training starts, for [`DropoutStage::Train`]), so the coordinator
//!   has everything up to that stage and nothing after;
//! - update dumps: each round's unmasked update written to disk, so tests can
//!   check the aggregate.
//!
//! Dropout simulations are a user feature (`greyfed simulate --dropout`,
//! `greyfed participant --drop-at`), so the hooks exist in release builds
//! too; a deployment leaves them at their default, [`TestHooks::default`]:
//! no hook.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use greyfed_protocol::{AggregationPayload, Message, secagg::message::SecAggUpload};

use crate::error::ParticipantError;

/// Where in a round a scheduled dropout happens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropoutStage {
    /// As local training starts.
    Train,
    /// Before sending the secure-aggregation public keys (stage 1).
    Advertise,
    /// Before sending the encrypted key shares (stage 2).
    Share,
    /// Before sending the masked update (stage 3; with plain aggregation: the update).
    Masked,
    /// Before sending the unmasking shares (stage 4).
    Unmask,
}

impl DropoutStage {
    /// All stages, in round order.
    pub const ALL: [DropoutStage; 5] = [
        DropoutStage::Train,
        DropoutStage::Advertise,
        DropoutStage::Share,
        DropoutStage::Masked,
        DropoutStage::Unmask,
    ];

    /// The stage whose message `msg` is, if any.
    pub fn of_message(msg: &Message) -> Option<DropoutStage> {
        let Message::Contribution { payload, .. } = msg else {
            return None;
        };
        #[allow(unreachable_patterns)]
        Some(match payload {
            AggregationPayload::Plain { .. } => DropoutStage::Masked,
            AggregationPayload::SecAgg { msg, .. } => match msg {
                SecAggUpload::AdvertiseKeys { .. } => DropoutStage::Advertise,
                SecAggUpload::EncryptedShares { .. } => DropoutStage::Share,
                SecAggUpload::MaskedInput { .. } => DropoutStage::Masked,
                SecAggUpload::UnmaskShares { .. } => DropoutStage::Unmask,
                _ => return None,
            },
            _ => return None,
        })
    }
}

impl fmt::Display for DropoutStage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DropoutStage::Train => "train",
            DropoutStage::Advertise => "advertise",
            DropoutStage::Share => "share",
            DropoutStage::Masked => "masked",
            DropoutStage::Unmask => "unmask",
        })
    }
}

impl FromStr for DropoutStage {
    type Err = ParticipantError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        DropoutStage::ALL
            .into_iter()
            .find(|st| st.to_string() == s)
            .ok_or_else(|| {
                ParticipantError::Dataset(format!(
                    "unknown dropout stage {s:?}; use train, advertise, share, masked or unmask"
                ))
            })
    }
}

/// A scheduled crash: at `stage` of `round`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DropoutPlan {
    /// Round number (from 1).
    pub round: u32,
    /// Point of the round.
    pub stage: DropoutStage,
}

impl FromStr for DropoutPlan {
    type Err = ParticipantError;

    /// Parses `ROUND:STAGE`, e.g. `2:masked`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            ParticipantError::Dataset(format!(
                "dropout plan {s:?}: use ROUND:STAGE, e.g. 2:masked"
            ))
        };
        let (round, stage) = s.split_once(':').ok_or_else(bad)?;
        let round: u32 = round.parse().map_err(|_| bad())?;
        if round == 0 {
            return Err(bad());
        }
        Ok(DropoutPlan {
            round,
            stage: stage.parse()?,
        })
    }
}

impl fmt::Display for DropoutPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.round, self.stage)
    }
}

/// How a scheduled dropout ends the participant.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CrashMode {
    /// The whole process dies by SIGKILL (where available; abort elsewhere):
    /// one participant per process, as `greyfed participant --drop-at` runs.
    #[default]
    KillProcess,
    /// The participant's task stops and drops its connection without closing
    /// it (in-process simulations: the coordinator sees silence), and
    /// [`run`](crate::run) returns a report whose
    /// [`vanished`](crate::ParticipantReport::vanished) names the plan.
    Vanish,
}

/// The participant's hooks for simulations and tests. The default has none
/// set, which is what a deployment uses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TestHooks {
    /// Crash at this point of a round (`None`: never).
    pub dropout: Option<DropoutPlan>,
    /// How the scheduled [`dropout`](Self::dropout) ends the participant
    /// (default: the process is killed).
    pub crash: CrashMode,
    /// Write each round's unmasked update (and weight) to
    /// `DIR/round-R-NAME.safetensors`, so tests can check the aggregate.
    /// Never enable in a deployment: it defeats secure aggregation locally.
    pub dump_updates: Option<PathBuf>,
    /// Train with the coordinator's seed alone, so that a run can be
    /// repeated exactly. By default a participant mixes fresh local
    /// randomness into every round's seed, so that a coordinator replaying
    /// a round cannot reproduce (and so isolate) its update.
    pub coordinator_seeds: bool,
}

/// Kills the current process with SIGKILL: no destructors, no flushing, no
/// QUIC close, exactly like `kill -9`.
pub(crate) fn kill_this_process() -> ! {
    #[cfg(unix)]
    {
        // SAFETY: getpid and kill have no memory-safety preconditions.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
    std::process::abort()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_parse_and_print() {
        for st in DropoutStage::ALL {
            let p: DropoutPlan = format!("3:{st}").parse().unwrap();
            assert_eq!(
                p,
                DropoutPlan {
                    round: 3,
                    stage: st
                }
            );
            assert_eq!(p.to_string().parse::<DropoutPlan>().unwrap(), p);
        }
        for bad in ["", "1", "0:train", "x:train", "1:sleep", ":masked"] {
            assert!(bad.parse::<DropoutPlan>().is_err(), "{bad}");
        }
    }
}
