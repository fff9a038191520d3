//! A malicious coordinator against real participants.
//!
//! The harness drives real participant state machines ([`SecAggParticipant`]
//! for one secure sum, [`ParticipantSession`] for the session-level attacks)
//! with real cryptography: certificates from one in-memory CA
//! ([`TestCa`], identities `p<id>`), X25519, HKDF, ChaCha20-Poly1305, Shamir
//! sharing and ECDSA signatures. There is no `SecAggCoordinator`: the test
//! itself plays the coordinator. It builds the [`RoundSetup`] the way
//! `SecAggCoordinator::begin_round` does, routes each stage's messages
//! (`Message::SecAgg`) to the participants it chooses, and records every
//! upload it receives in a [`Transcript`]: all a coordinator ever learns.
//!
//! [`Cohort`]'s stage helpers (`setup_stage` … `unmask_stage`) relay
//! honestly; an attack replaces one of them, for one target, with a message
//! of its own (substituted keys, forged signatures, another setup, a lying
//! survivor set …). Each test then checks two things:
//!
//! 1. the targeted honest participant refuses: it is poisoned with an error
//!    that names the cause, and uploads nothing more;
//! 2. the coordinator cannot recover the target's individual input:
//!    [`Cohort::recover`] is its best effort (the target's masked input,
//!    minus the self mask rebuilt from every share of the seed it obtained,
//!    including shares opened with keys it substituted, minus each pairwise
//!    mask it can derive), and the test asserts what stopped it.
//!
//! Every input is `±c` with an integer weight, so its encoding is exact (no
//! stochastic rounding) and a recovered input is compared bit for bit. The
//! control test `control_t_corrupt_neighbours_let_the_harness_recover_the_input`
//! shows that the same recovery succeeds once the target accepts substituted
//! keys, so a "not recovered" verdict elsewhere is not vacuous.
//!
//! Every error a participant returns is finally checked for leaked secrets
//! ([`Cohort::assert_errors_clean`]): no key, commitment, signature or
//! ciphertext in hex, and no long run of digits (a share value).
//!
//! One attack succeeds by design: a CA-key holder re-issuing certificates
//! when participants have no peer allow list (the trust assumption the
//! threat model states); its test pins that, next to the allow-list test
//! that refuses it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, OnceLock};

use greyfed_protocol::{
    AggregationKind, AggregationPayload, EvalMetrics, GlobalModel, Hello, MAX_EVAL_LOSS, Message,
    ModelSpec, ModelWeights, NamedTensor, PROTOCOL_VERSION, ParticipantId, ProtocolError,
    SessionInfo, SumKind, TrainingConfig,
    participant::{ParticipantEvent, ParticipantSession},
    secagg::{
        auth::{
            SecAggAuth, SecAggPolicy, Signature, StatementSigner, keys_statement,
            self_mask_commitment, setup_digest,
        },
        coordinator::SecAggConfig,
        encode::{EncodingParams, decode, unpack},
        graph::{NeighbourGraph, graph_params, threshold_for},
        keys::{
            KeyPair, RoundContext, SharePair, open_share_pair, pairwise_mask_seed, seal_share_pair,
            share_channel_key,
        },
        message::{NeighbourKey, RoundSetup, SecAggDownload, SecAggUpload, SignedKeys},
        participant::{ParticipantStage, SecAggParticipant},
        prg::{PrgKind, add_mask, sub_mask},
        shamir::{CHUNKS, LagrangeCache, Share, combine},
        testing::TestCa,
        x509::{CertificateSigner, CertificateVerifier, fingerprint},
    },
};
use rand::{SeedableRng, rngs::StdRng};
use rustls_pki_types::UnixTime;

type Id = ParticipantId;
/// Errors returned by the participants a stage message went to.
type Errs = Vec<(Id, ProtocolError)>;

const SESSION: u64 = 0x0bad_c0de;
const ROUND: u32 = 1;
/// Cohort size of most tests: full graph, `k = 6`, `t = 4` with the default
/// policy (the coordinator's `graph_params` for 7 participants).
const N: usize = 7;
/// Values per update.
const D: usize = 8;
const CLIP: f32 = 1.0;
const BITS: u32 = 16;
const MAX_WEIGHT: u32 = 16;
/// The digest of the model the participant-level rounds are about.
const MODEL: [u8; 32] = [0x11; 32];
/// The participant every attack aims at.
const TARGET: Id = 0;

const KEYS: &str = "SecAgg::AdvertiseKeys";
const SHARES: &str = "SecAgg::EncryptedShares";
const MASKED: &str = "SecAgg::MaskedInput";
const SIGNED: &str = "SecAgg::SurvivorSignature";
const UNMASK: &str = "SecAgg::UnmaskShares";

/// The deployment CA every participant trusts.
fn ca() -> &'static TestCa {
    static CA: OnceLock<TestCa> = OnceLock::new();
    CA.get_or_init(TestCa::new)
}

/// A CA nobody in the cohort trusts (the coordinator's own).
fn other_ca() -> &'static TestCa {
    static CA: OnceLock<TestCa> = OnceLock::new();
    CA.get_or_init(TestCa::new)
}

fn auth(id: Id) -> SecAggAuth {
    ca().auth(&format!("p{id}"), SecAggPolicy::default())
}

/// Participant `id`'s update: `±c` only, weight `id + 1`.
fn input(id: Id) -> (Vec<f32>, u32) {
    let update = (0..D)
        .map(|k| {
            if (k + id as usize).is_multiple_of(3) {
                -CLIP
            } else {
                CLIP
            }
        })
        .collect();
    (update, id + 1)
}

/// The exact encoding of an update of `±c` values with weight `w`: `0` for
/// `-c`, `w (2^b - 1)` for `+c`, then the weight.
fn exact_encoding(update: &[f32], w: u32) -> Vec<u32> {
    let top = (1u32 << BITS) - 1;
    update
        .iter()
        .map(|&x| if x > 0.0 { w * top } else { 0 })
        .chain([w])
        .collect()
}

fn encoded(id: Id) -> Vec<u32> {
    let (update, w) = input(id);
    exact_encoding(&update, w)
}

fn update_encoding(n: usize) -> EncodingParams {
    EncodingParams::new(CLIP, BITS, MAX_WEIGHT, n).unwrap()
}

/// The setup an honest coordinator builds for `members`, as
/// `SecAggCoordinator::begin_round` does: `k` and `t` from `graph_params`
/// with the coordinator's default bounds ([`SecAggConfig::new`], SecAgg+),
/// the encoding for the cohort size, and a shuffled graph order.
fn honest_setup(
    round: u32,
    members: &[Id],
    encoding: EncodingParams,
    num_elements: usize,
    model_digest: [u8; 32],
) -> RoundSetup {
    let config = SecAggConfig::new(SESSION, [0; 32]);
    let (delta, gamma) = (config.dropout_fraction, config.corrupt_fraction);
    let gp = graph_params(members.len(), delta, gamma, config.full).unwrap();
    let mut rng = StdRng::seed_from_u64(0x5e7u64 ^ u64::from(round));
    let graph = NeighbourGraph::random(members, gp.degree, &mut rng).unwrap();
    RoundSetup {
        session_id: SESSION,
        round,
        prg: PrgKind::ChaCha12,
        encoding,
        graph_order: graph.order().to_vec(),
        degree: gp.degree as u32,
        threshold: gp.threshold as u32,
        num_elements: num_elements as u64,
        model_digest,
        paired: None,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn crypto_text(err: &ProtocolError) -> &str {
    match err {
        ProtocolError::Crypto(text) => text,
        other => panic!("expected a Crypto error, got {other:?}"),
    }
}

#[track_caller]
fn ok(errs: Errs) {
    assert!(errs.is_empty(), "honest messages refused: {errs:?}");
}

/// A participant-side state machine the fake coordinator talks to.
trait Endpoint {
    fn deliver(&mut self, msg: Message, rng: &mut StdRng) -> Result<(), ProtocolError>;
    /// Drains the secure sum's uploads: `(round, stage message)`.
    fn uploads(&mut self) -> Vec<(u32, SecAggUpload)>;
}

impl Endpoint for SecAggParticipant {
    fn deliver(&mut self, msg: Message, rng: &mut StdRng) -> Result<(), ProtocolError> {
        self.handle_message(msg, rng)
    }

    fn uploads(&mut self) -> Vec<(u32, SecAggUpload)> {
        std::iter::from_fn(|| self.poll_transmit())
            .map(|p| match p {
                AggregationPayload::SecAgg { round, msg } => (round, msg),
                other => panic!("a participant uploaded {}", other.kind()),
            })
            .collect()
    }
}

impl Endpoint for ParticipantSession {
    fn deliver(&mut self, msg: Message, rng: &mut StdRng) -> Result<(), ProtocolError> {
        self.handle_message(msg, rng)
    }

    fn uploads(&mut self) -> Vec<(u32, SecAggUpload)> {
        std::iter::from_fn(|| self.poll_transmit())
            .map(|m| match m {
                Message::Contribution {
                    payload: AggregationPayload::SecAgg { round, msg },
                    ..
                }
                | Message::Evaluation {
                    payload: AggregationPayload::SecAgg { round, msg },
                    ..
                } => (round, msg),
                other => panic!("a session sent {}", other.kind()),
            })
            .collect()
    }
}

/// Everything the coordinator received in one secure sum.
#[derive(Default)]
struct Transcript {
    keys: BTreeMap<Id, SignedKeys>,
    /// Sealed share pairs by `(sender, recipient)`.
    sealed: BTreeMap<(Id, Id), Vec<u8>>,
    masked: BTreeMap<Id, Vec<u8>>,
    signatures: BTreeMap<Id, Signature>,
    /// Revealed shares of each owner's self-mask seed: `(holder, share)`.
    self_mask_shares: BTreeMap<Id, Vec<(Id, Share)>>,
    /// Revealed shares of each owner's mask key: `(holder, share)`.
    key_shares: BTreeMap<Id, Vec<(Id, Share)>>,
}

/// Key pairs the coordinator generated to pose as one neighbour.
struct Fake {
    c: KeyPair,
    s: KeyPair,
}

/// The coordinator's best attempt at one participant's input.
#[derive(Debug, PartialEq)]
enum Recovery {
    /// The target never sent a masked input; `shares` of its self-mask seed
    /// were obtained.
    NoMaskedInput { shares: usize },
    /// Too few shares of the target's self-mask seed.
    SelfMaskHidden { shares: usize, need: usize },
    /// The pairwise mask with neighbour `with` cannot be derived: too few
    /// shares of the target's mask key (and no key of the coordinator's).
    PairwiseMaskHidden {
        with: Id,
        key_shares: usize,
        need: usize,
    },
    /// The shares obtained do not combine.
    Inconsistent,
    /// The masked input with every mask removed: the input, if all went right.
    Unmasked(Vec<u32>),
}

/// The participants of one secure sum and the coordinator's view of it.
struct Cohort<E> {
    members: BTreeMap<Id, E>,
    auths: BTreeMap<Id, SecAggAuth>,
    rngs: BTreeMap<Id, StdRng>,
    /// The coordinator's own randomness (for the keys it forges).
    rng: StdRng,
    ctx: RoundContext,
    /// The setup an honest coordinator hands everyone.
    setup: RoundSetup,
    graph: NeighbourGraph,
    got: Transcript,
    /// The kinds of upload each participant sent in this sum, in order.
    sent: BTreeMap<Id, Vec<&'static str>>,
    /// Every error a participant returned.
    errors: Errs,
    /// Secrets of the coordinator's that must not show up in errors.
    forged: Vec<[u8; 32]>,
}

/// `n` participants (ids `0..n`) with credentials `p<id>`, the default
/// policy, the model [`MODEL`] and their inputs already set.
fn cohort(n: usize) -> Cohort<SecAggParticipant> {
    cohort_with(n, |id| (auth(id), MODEL))
}

/// `n` participants; `member(id)` gives each its credentials and the model
/// digest it was sent.
fn cohort_with(
    n: usize,
    member: impl Fn(Id) -> (SecAggAuth, [u8; 32]),
) -> Cohort<SecAggParticipant> {
    let ids: Vec<Id> = (0..n as Id).collect();
    let ctx = RoundContext::update(SESSION, ROUND);
    let setup = honest_setup(ROUND, &ids, update_encoding(n), D + 1, MODEL);
    let (mut members, mut auths, mut rngs) = (BTreeMap::new(), BTreeMap::new(), BTreeMap::new());
    for id in ids {
        let (auth, model) = member(id);
        let mut rng = StdRng::seed_from_u64(u64::from(id) + 1);
        let mut p = SecAggParticipant::new(id, ctx, Some(D), auth.clone(), model);
        let (update, weight) = input(id);
        p.set_input(&update, weight, &mut rng).unwrap();
        members.insert(id, p);
        auths.insert(id, auth);
        rngs.insert(id, rng);
    }
    Cohort::new(members, auths, rngs, ctx, setup)
}

impl<E: Endpoint> Cohort<E> {
    fn new(
        members: BTreeMap<Id, E>,
        auths: BTreeMap<Id, SecAggAuth>,
        rngs: BTreeMap<Id, StdRng>,
        ctx: RoundContext,
        setup: RoundSetup,
    ) -> Self {
        let graph =
            NeighbourGraph::from_order(setup.graph_order.clone(), setup.degree as usize).unwrap();
        Self {
            members,
            auths,
            rngs,
            rng: StdRng::seed_from_u64(0xbad),
            ctx,
            setup,
            graph,
            got: Transcript::default(),
            sent: BTreeMap::new(),
            errors: Vec::new(),
            forged: Vec::new(),
        }
    }

    /// Starts another secure sum with the same participants.
    fn begin_sum(&mut self, ctx: RoundContext, setup: RoundSetup) {
        self.graph =
            NeighbourGraph::from_order(setup.graph_order.clone(), setup.degree as usize).unwrap();
        self.ctx = ctx;
        self.setup = setup;
        self.got = Transcript::default();
        self.sent.clear();
    }

    /// The members of the honest setup, ascending.
    fn ids(&self) -> Vec<Id> {
        let mut ids = self.setup.graph_order.clone();
        ids.sort_unstable();
        ids
    }

    fn threshold(&self) -> usize {
        self.setup.threshold as usize
    }

    fn sent(&self, id: Id) -> &[&'static str] {
        self.sent.get(&id).map_or(&[], Vec::as_slice)
    }

    /// Sends `msg` to `to` and records what it uploads in answer.
    fn send(&mut self, to: Id, msg: SecAggDownload) -> Result<(), ProtocolError> {
        let message = Message::SecAgg {
            round: self.ctx.round,
            sum: self.ctx.sum,
            msg,
        };
        let member = self.members.get_mut(&to).expect("a cohort member");
        let result = member.deliver(message, self.rngs.get_mut(&to).expect("its rng"));
        self.collect(to);
        if let Err(e) = &result {
            self.errors.push((to, e.clone()));
        }
        result
    }

    fn collect(&mut self, id: Id) {
        for (round, upload) in self.members.get_mut(&id).unwrap().uploads() {
            assert_eq!(
                round, self.ctx.round,
                "participant {id} uploaded for round {round}"
            );
            self.sent.entry(id).or_default().push(upload.kind());
            let got = &mut self.got;
            match upload {
                SecAggUpload::AdvertiseKeys(keys) => {
                    got.keys.insert(id, keys);
                }
                SecAggUpload::EncryptedShares { shares } => {
                    for (to, ct) in shares {
                        got.sealed.insert((id, to), ct);
                    }
                }
                SecAggUpload::MaskedInput { packed } => {
                    got.masked.insert(id, packed);
                }
                SecAggUpload::SurvivorSignature { signature } => {
                    got.signatures.insert(id, signature);
                }
                SecAggUpload::UnmaskShares {
                    self_mask_shares,
                    key_shares,
                } => {
                    for (owner, share) in self_mask_shares {
                        got.self_mask_shares
                            .entry(owner)
                            .or_default()
                            .push((id, share));
                    }
                    for (owner, share) in key_shares {
                        got.key_shares.entry(owner).or_default().push((id, share));
                    }
                }
                other => panic!("unknown upload {}", other.kind()),
            }
        }
    }

    /// Sends `msg(self, id)` to each of `ids`; the refusals.
    fn each(&mut self, ids: &[Id], msg: impl Fn(&Self, Id) -> SecAggDownload) -> Errs {
        let mut errs = Vec::new();
        for &id in ids {
            let m = msg(self, id);
            if let Err(e) = self.send(id, m) {
                errs.push((id, e));
            }
        }
        errs
    }

    // --- The honest coordinator, stage by stage. ---

    fn setup_stage(&mut self, ids: &[Id]) -> Errs {
        self.each(ids, |c, _| SecAggDownload::Setup(c.setup.clone()))
    }

    /// What an honest coordinator forwards to `u`: the signed keys of its
    /// graph neighbours that advertised.
    fn neighbour_keys(&self, u: Id) -> Vec<NeighbourKey> {
        self.graph
            .neighbours(u)
            .into_iter()
            .filter_map(|j| {
                self.got.keys.get(&j).map(|k| NeighbourKey {
                    id: j,
                    keys: k.clone(),
                })
            })
            .collect()
    }

    fn keys_stage(&mut self, ids: &[Id]) -> Errs {
        self.each(ids, |c, u| SecAggDownload::NeighbourKeys {
            keys: c.neighbour_keys(u),
        })
    }

    /// The sealed share pairs addressed to `u`, ascending by sender.
    fn shares_for(&self, u: Id) -> Vec<(Id, Vec<u8>)> {
        self.got
            .sealed
            .iter()
            .filter(|((_, to), _)| *to == u)
            .map(|((from, _), ct)| (*from, ct.clone()))
            .collect()
    }

    fn shares_stage(&mut self, ids: &[Id]) -> Errs {
        self.each(ids, |c, u| SecAggDownload::SharesForYou {
            shares: c.shares_for(u),
        })
    }

    fn survivors_stage(&mut self, ids: &[Id], survivors: &[Id]) -> Errs {
        self.each(ids, |_, _| SecAggDownload::SurvivorSet {
            survivors: survivors.to_vec(),
        })
    }

    /// The survivor signatures of `u`'s neighbours among `signers`.
    fn signatures_for(&self, u: Id, signers: &[Id]) -> Vec<(Id, Signature)> {
        let signers: BTreeSet<Id> = signers.iter().copied().collect();
        signers
            .into_iter()
            .filter(|&j| j != u && self.graph.are_neighbours(u, j))
            .filter_map(|j| self.got.signatures.get(&j).map(|s| (j, s.clone())))
            .collect()
    }

    /// Sends each of `ids` the survivor signatures of its neighbours among `signers`.
    fn unmask_stage(&mut self, ids: &[Id], signers: &[Id]) -> Errs {
        self.each(ids, |c, u| SecAggDownload::UnmaskRequest {
            signatures: c.signatures_for(u, signers),
        })
    }

    /// All five stages, honestly, for everyone; nobody drops. Returns `U3`.
    fn run_honestly(&mut self) -> Vec<Id> {
        let ids = self.ids();
        ok(self.setup_stage(&ids));
        ok(self.keys_stage(&ids));
        ok(self.shares_stage(&ids));
        ok(self.survivors_stage(&ids, &ids));
        ok(self.unmask_stage(&ids, &ids));
        ids
    }

    // --- What the coordinator computes from its transcript. ---

    /// An honest coordinator's result: the unmasked ring sum of
    /// `survivors`' inputs, each reconstructed secret checked against the
    /// owner's signed commitment or public key; the pairwise masks of the
    /// participants that shared keys but did not survive are removed with
    /// their reconstructed mask keys.
    fn unmasked_sum(&self, survivors: &[Id]) -> Result<Vec<u32>, String> {
        let (t, m, prg) = (
            self.threshold(),
            self.setup.num_elements as usize,
            self.setup.prg,
        );
        let digest = setup_digest(&self.setup);
        let mut cache = LagrangeCache::new();
        let mut sum = vec![0u32; m];
        for u in survivors {
            let packed = self
                .got
                .masked
                .get(u)
                .ok_or(format!("no masked input from {u}"))?;
            let y = unpack(packed, self.setup.encoding.ring_bits, m).map_err(|e| e.to_string())?;
            for (s, v) in sum.iter_mut().zip(y) {
                *s = s.wrapping_add(v);
            }
            let b = secret(&self.got.self_mask_shares, *u, t, &mut cache)?;
            if self_mask_commitment(&b) != self.got.keys[u].commitment {
                return Err(format!(
                    "{u}'s self-mask seed does not match its commitment"
                ));
            }
            sub_mask(prg, &b, &mut sum);
        }
        let shared_keys: BTreeSet<Id> = self.got.sealed.keys().map(|(from, _)| *from).collect();
        for &v in shared_keys.iter().filter(|v| !survivors.contains(v)) {
            let s = KeyPair::from_secret_bytes(secret(&self.got.key_shares, v, t, &mut cache)?);
            let pk_v = self.got.keys[&v].s_pk;
            if s.public() != pk_v {
                return Err(format!("{v}'s mask key does not match its public key"));
            }
            for &u in survivors
                .iter()
                .filter(|&&u| self.graph.are_neighbours(u, v))
            {
                let pk_u = self.got.keys[&u].s_pk;
                let shared = s.agree(&pk_u).map_err(|e| e.to_string())?;
                let seed = pairwise_mask_seed(&shared, &self.ctx, &digest, (v, pk_v), (u, pk_u));
                // u added +PRG(seed) when u < v, -PRG(seed) otherwise.
                if u < v {
                    sub_mask(prg, &seed, &mut sum);
                } else {
                    add_mask(prg, &seed, &mut sum);
                }
            }
        }
        let ring = self.setup.encoding.ring_mask();
        Ok(sum.into_iter().map(|s| s & ring).collect())
    }

    /// The channel key the coordinator shares with `target` as fake neighbour `j`.
    fn fake_channel_key(&self, fake: &Fake, j: Id, target: Id, setup: &RoundSetup) -> [u8; 32] {
        let c_pk = self.got.keys[&target].c_pk;
        let shared = fake.c.agree(&c_pk).unwrap();
        let digest = setup_digest(setup);
        share_channel_key(
            &shared,
            &self.ctx,
            &digest,
            (target, c_pk),
            (j, fake.c.public()),
        )
    }

    /// The coordinator's best attempt at `target`'s input, given the setup
    /// the target accepted, the keys it substituted (`fakes`) and the
    /// neighbours whose shares it let reach the target (`masked_with`: the
    /// target's `N2`). See the module docs.
    fn recover(
        &self,
        target: Id,
        setup: &RoundSetup,
        fakes: &BTreeMap<Id, Fake>,
        masked_with: &[Id],
    ) -> Recovery {
        let t = setup.threshold as usize;
        let revealed = |m: &BTreeMap<Id, Vec<(Id, Share)>>| -> Vec<Share> {
            m.get(&target)
                .into_iter()
                .flatten()
                .map(|(_, s)| s.clone())
                .collect()
        };
        let mut b_shares = revealed(&self.got.self_mask_shares);
        let mut s_shares = revealed(&self.got.key_shares);
        let target_keys = self.got.keys.get(&target);
        if target_keys.is_some() {
            for (&j, fake) in fakes {
                let Some(ct) = self.got.sealed.get(&(target, j)) else {
                    continue;
                };
                let key = self.fake_channel_key(fake, j, target, setup);
                let pair = open_share_pair(&key, &self.ctx, target, j, ct)
                    .expect("a pair sealed to the coordinator's key opens");
                b_shares.push(pair.self_mask_share.clone());
                s_shares.push(pair.key_share.clone());
            }
        }
        let Some(packed) = self.got.masked.get(&target) else {
            return Recovery::NoMaskedInput {
                shares: b_shares.len(),
            };
        };
        let target_keys = target_keys.expect("keys before a masked input");
        if b_shares.len() < t {
            return Recovery::SelfMaskHidden {
                shares: b_shares.len(),
                need: t,
            };
        }
        let mut cache = LagrangeCache::new();
        let Ok(b) = combine(&b_shares, t, &mut cache) else {
            return Recovery::Inconsistent;
        };
        let m = setup.num_elements as usize;
        let mut y = unpack(packed, setup.encoding.ring_bits, m).unwrap();
        sub_mask(setup.prg, &b, &mut y);
        let target_s = if s_shares.len() >= t {
            match combine(&s_shares, t, &mut cache) {
                Ok(s) => Some(KeyPair::from_secret_bytes(s)),
                Err(_) => return Recovery::Inconsistent,
            }
        } else {
            None
        };
        let digest = setup_digest(setup);
        let pk_t = target_keys.s_pk;
        for &j in masked_with {
            let (shared, pk_j) = if let Some(fake) = fakes.get(&j) {
                (fake.s.agree(&pk_t).unwrap(), fake.s.public())
            } else if let Some(s) = &target_s {
                let pk_j = self.got.keys[&j].s_pk;
                (s.agree(&pk_j).unwrap(), pk_j)
            } else {
                return Recovery::PairwiseMaskHidden {
                    with: j,
                    key_shares: s_shares.len(),
                    need: t,
                };
            };
            let seed = pairwise_mask_seed(&shared, &self.ctx, &digest, (target, pk_t), (j, pk_j));
            if target < j {
                sub_mask(setup.prg, &seed, &mut y);
            } else {
                add_mask(setup.prg, &seed, &mut y);
            }
        }
        let ring = setup.encoding.ring_mask();
        Recovery::Unmasked(y.into_iter().map(|v| v & ring).collect())
    }

    // --- The coordinator's forgeries. ---

    /// Keys the coordinator generated for participant `id`, signed by
    /// `signer` over `setup` (as if `id` had advertised them).
    fn forged_entry(
        &mut self,
        id: Id,
        setup: &RoundSetup,
        signer: &dyn StatementSigner,
    ) -> (NeighbourKey, Fake) {
        let fake = self.fake();
        let commitment = self_mask_commitment(&[0x42; 32]);
        let statement = keys_statement(
            &setup_digest(setup),
            self.ctx.sum,
            id,
            &fake.c.public(),
            &fake.s.public(),
            &commitment,
        );
        let keys = SignedKeys {
            c_pk: fake.c.public(),
            s_pk: fake.s.public(),
            commitment,
            credential: signer.credential().to_vec(),
            signature: signer.sign(&statement).unwrap(),
        };
        (NeighbourKey { id, keys }, fake)
    }

    fn fake(&mut self) -> Fake {
        let fake = Fake {
            c: KeyPair::generate(&mut self.rng),
            s: KeyPair::generate(&mut self.rng),
        };
        self.forged
            .extend([fake.c.secret_bytes(), fake.s.secret_bytes()]);
        fake
    }

    /// `target`'s honest neighbour list with the entries of `victims`
    /// replaced by keys of the coordinator's. `signer(j)` is what it signs
    /// the entry for `j` with; `None` keeps `j`'s certificate and signature.
    fn substituted_keys(
        &mut self,
        target: Id,
        victims: &[Id],
        signer: impl Fn(&Self, Id) -> Option<Arc<dyn StatementSigner>>,
    ) -> (Vec<NeighbourKey>, BTreeMap<Id, Fake>) {
        let setup = self.setup.clone();
        let mut keys = self.neighbour_keys(target);
        let mut fakes = BTreeMap::new();
        for entry in keys.iter_mut().filter(|e| victims.contains(&e.id)) {
            let fake = match signer(self, entry.id) {
                Some(signer) => {
                    let (forged, fake) = self.forged_entry(entry.id, &setup, &*signer);
                    *entry = forged;
                    fake
                }
                None => {
                    let fake = self.fake();
                    entry.keys.c_pk = fake.c.public();
                    entry.keys.s_pk = fake.s.public();
                    fake
                }
            };
            fakes.insert(entry.id, fake);
        }
        (keys, fakes)
    }

    /// Every error so far is free of secrets: no key, commitment, signature
    /// or ciphertext of this sum (nor a key the coordinator forged) in hex,
    /// no run of 16 or more hex digits (a share value in decimal is 19
    /// digits), and short.
    fn assert_errors_clean(&self) {
        let mut material: Vec<Vec<u8>> = self.forged.iter().map(|k| k.to_vec()).collect();
        for k in self.got.keys.values() {
            material.extend([k.c_pk.to_vec(), k.s_pk.to_vec(), k.commitment.to_vec()]);
            material.push(k.signature.bytes.clone());
        }
        material.extend(self.got.sealed.values().cloned());
        for (id, err) in &self.errors {
            let text = err.to_string();
            let run = text
                .split(|c: char| !c.is_ascii_hexdigit())
                .map(str::len)
                .max()
                .unwrap_or(0);
            assert!(
                run < 16,
                "participant {id}'s error has {run} hex digits in a row: {text}"
            );
            assert!(text.len() < 600, "participant {id}'s error is long: {text}");
            for m in material.iter().filter(|m| m.len() >= 8) {
                assert!(
                    !text.to_ascii_lowercase().contains(&hex(&m[..8])),
                    "participant {id}'s error shows key material: {text}"
                );
            }
        }
    }
}

/// Reconstructs `owner`'s secret from the shares revealed for it.
fn secret(
    shares: &BTreeMap<Id, Vec<(Id, Share)>>,
    owner: Id,
    t: usize,
    cache: &mut LagrangeCache,
) -> Result<[u8; 32], String> {
    let shares: Vec<Share> = shares
        .get(&owner)
        .into_iter()
        .flatten()
        .map(|(_, s)| s.clone())
        .collect();
    if shares.len() < t {
        return Err(format!(
            "only {} shares of {owner}'s secret, {t} needed",
            shares.len()
        ));
    }
    combine(&shares, t, cache).map_err(|e| e.to_string())
}

/// The ring sum of `ids`' exact encodings.
fn expected_sum(c: &Cohort<SecAggParticipant>, ids: &[Id]) -> Vec<u32> {
    let mut sum = vec![0u32; D + 1];
    for &id in ids {
        for (s, v) in sum.iter_mut().zip(encoded(id)) {
            *s = s.wrapping_add(v);
        }
    }
    let ring = c.setup.encoding.ring_mask();
    sum.into_iter().map(|s| s & ring).collect()
}

/// The first `t` neighbours of `target`, ascending: enough shares to rebuild its secrets.
fn first_neighbours(c: &Cohort<SecAggParticipant>, target: Id) -> Vec<Id> {
    c.graph.neighbours(target)[..c.threshold()].to_vec()
}

/// After `target` accepted the coordinator's `fakes` as neighbours: the
/// coordinator hands it share pairs sealed under the fakes' channel keys,
/// plus the real ones from the honest neighbours in `also` (it needs `t` in
/// all to go on), collects its masked input and unmasks it.
fn exploit_substitution(
    c: &mut Cohort<SecAggParticipant>,
    target: Id,
    fakes: &BTreeMap<Id, Fake>,
    also: &[Id],
) -> Recovery {
    let setup = c.setup.clone();
    let x = u64::from(target) + 1;
    let mut shares: Vec<(Id, Vec<u8>)> = fakes
        .iter()
        .map(|(&j, fake)| {
            let pair = SharePair {
                from: j,
                to: target,
                key_share: Share { x, y: [7; CHUNKS] },
                self_mask_share: Share { x, y: [9; CHUNKS] },
            };
            let key = c.fake_channel_key(fake, j, target, &setup);
            (j, seal_share_pair(&key, &c.ctx, &pair))
        })
        .collect();
    shares.extend(
        c.shares_for(target)
            .into_iter()
            .filter(|(j, _)| also.contains(j)),
    );
    shares.sort_by_key(|(j, _)| *j);
    let masked_with: Vec<Id> = shares.iter().map(|(j, _)| *j).collect();
    // A refusal shows in the transcript: no masked input.
    let _ = c.send(target, SecAggDownload::SharesForYou { shares });
    c.recover(target, &setup, fakes, &masked_with)
}

/// Asserts that `target` refused the neighbour keys it was sent: poisoned
/// with `err`, a Crypto error naming `neighbour` and containing `cause`,
/// having uploaded nothing but its own keys; and that the coordinator holds
/// no share and no masked input of it.
#[track_caller]
fn assert_refused_keys(
    c: &Cohort<SecAggParticipant>,
    target: Id,
    err: &ProtocolError,
    neighbour: Id,
    cause: &str,
    fakes: &BTreeMap<Id, Fake>,
) {
    let text = crypto_text(err);
    assert!(
        text.contains(&format!("neighbour {neighbour}'s keys are not authentic")),
        "{text}"
    );
    assert!(text.contains(cause), "expected {cause:?} in: {text}");
    assert_eq!(c.members[&target].stage(), ParticipantStage::Poisoned);
    assert_eq!(c.members[&target].error(), Some(err));
    assert_eq!(c.sent(target), [KEYS], "the target sealed no share");
    let neighbours = c.graph.neighbours(target);
    assert_eq!(
        c.recover(target, &c.setup, fakes, &neighbours),
        Recovery::NoMaskedInput { shares: 0 }
    );
}

/// Asserts that a stage-2 split (the target and its neighbours were given
/// different setups) was refused by everyone in `c`: the target blames its
/// first neighbour, every other participant blames the target, all for a
/// signature that does not verify; no share was sealed.
#[track_caller]
fn assert_split_refused(c: &Cohort<SecAggParticipant>, errs: &Errs, what: &str) {
    let refusing: Vec<Id> = errs.iter().map(|(id, _)| *id).collect();
    assert_eq!(refusing, c.ids(), "{what}: everyone refuses");
    for (id, err) in errs {
        let blamed = if *id == TARGET {
            c.graph.neighbours(TARGET)[0]
        } else {
            TARGET
        };
        let text = crypto_text(err);
        assert!(
            text.contains(&format!("neighbour {blamed}'s keys are not authentic"))
                && text.contains("the signature does not verify"),
            "{what}: participant {id}: {text}"
        );
        assert_eq!(
            c.sent(*id),
            [KEYS],
            "{what}: participant {id} sealed no share"
        );
    }
    assert!(c.got.sealed.is_empty());
    assert_eq!(
        c.recover(TARGET, &c.setup, &BTreeMap::new(), &[]),
        Recovery::NoMaskedInput { shares: 0 }
    );
}

/// The ids of `c` other than the target.
fn others(c: &Cohort<SecAggParticipant>) -> Vec<Id> {
    c.ids().into_iter().filter(|&id| id != TARGET).collect()
}

// ---------------------------------------------------------------------------
// The honest coordinator.
// ---------------------------------------------------------------------------

/// Honest coordinator: every participant completes the round (`Done`) and
/// the coordinator's unmasked sum is exactly the sum of the encoded inputs;
/// even so, its transcript does not unmask any one participant.
#[test]
fn honest_round_completes_end_to_end() {
    let mut c = cohort(N);
    assert_eq!((c.setup.degree, c.setup.threshold), (6, 4));
    let all = c.run_honestly();
    for id in &all {
        assert_eq!(
            c.members[id].stage(),
            ParticipantStage::Done,
            "participant {id}"
        );
        assert_eq!(c.sent(*id), [KEYS, SHARES, MASKED, SIGNED, UNMASK]);
    }
    let sum = c.unmasked_sum(&all).unwrap();
    assert_eq!(sum, expected_sum(&c, &all));
    let (mean, total) = decode(&c.setup.encoding, &sum).unwrap();
    assert_eq!(
        total,
        all.iter().map(|&id| u64::from(input(id).1)).sum::<u64>()
    );
    for (k, got) in mean.iter().enumerate() {
        let exact: f64 = all
            .iter()
            .map(|&id| f64::from(input(id).1) * f64::from(input(id).0[k]))
            .sum::<f64>()
            / total as f64;
        assert!(
            (f64::from(*got) - exact).abs() < 1e-5,
            "element {k}: {got} vs {exact}"
        );
    }
    // The self-mask seed of a survivor is revealed, its mask key is not.
    let neighbours = c.graph.neighbours(TARGET);
    assert_eq!(
        c.recover(TARGET, &c.setup, &BTreeMap::new(), &neighbours),
        Recovery::PairwiseMaskHidden {
            with: neighbours[0],
            key_shares: 0,
            need: 4
        }
    );
    assert!(c.errors.is_empty());
}

/// Control for the key-substitution attacks: if the target accepts keys of
/// the coordinator's for `t` neighbours (here because those neighbours'
/// own signing keys were used, i.e. `t` corrupt neighbours, beyond the
/// threat model), the harness's recovery rebuilds its input bit for bit.
/// So the "not recovered" verdicts of the other tests are not vacuous.
#[test]
fn control_t_corrupt_neighbours_let_the_harness_recover_the_input() {
    let mut c = cohort(N);
    ok(c.setup_stage(&c.ids()));
    let victims = first_neighbours(&c, TARGET);
    let (keys, fakes) =
        c.substituted_keys(TARGET, &victims, |c, j| Some(c.auths[&j].signer.clone()));
    c.send(TARGET, SecAggDownload::NeighbourKeys { keys })
        .unwrap();
    assert_eq!(c.sent(TARGET), [KEYS, SHARES]);
    let recovery = exploit_substitution(&mut c, TARGET, &fakes, &[]);
    assert_eq!(c.sent(TARGET), [KEYS, SHARES, MASKED]);
    assert_eq!(recovery, Recovery::Unmasked(encoded(TARGET)));
    c.assert_errors_clean();

    // With one corrupt neighbour fewer (t - 1 substituted keys, the rest
    // honest), the target's self-mask seed stays hidden.
    let mut c = cohort(N);
    ok(c.setup_stage(&c.ids()));
    let neighbours = c.graph.neighbours(TARGET);
    let (victims, honest) = neighbours.split_at(c.threshold() - 1);
    let (keys, fakes) =
        c.substituted_keys(TARGET, victims, |c, j| Some(c.auths[&j].signer.clone()));
    c.send(TARGET, SecAggDownload::NeighbourKeys { keys })
        .unwrap();
    ok(c.keys_stage(honest));
    let recovery = exploit_substitution(&mut c, TARGET, &fakes, honest);
    assert_eq!(c.sent(TARGET), [KEYS, SHARES, MASKED]);
    assert_eq!(recovery, Recovery::SelfMaskHidden { shares: 3, need: 4 });
    c.assert_errors_clean();
}

// ---------------------------------------------------------------------------
// 1. Key substitution.
// ---------------------------------------------------------------------------

/// Attack 1, key substitution: the coordinator replaces the keys (`c_pk`,
/// `s_pk`) of `t` of the target's neighbours with key pairs of its own, so
/// that the target seals its shares (and masks) to the coordinator. It has
/// no neighbour's signing key, so it (a) keeps the neighbours' certificates
/// and signatures, (b) signs with a certificate of its own from another CA,
/// or (c) signs with certificates from the deployment CA for another
/// listed neighbour's identity (a sybil of p5). Expected: the target
/// refuses the list with a Crypto error naming the first bad neighbour,
/// seals no share and sends no masked input; pressing on with forged
/// shares changes nothing. The coordinator holds 0 shares of the target.
#[test]
fn key_substitution_is_refused() {
    type Signer<'a> =
        &'a dyn Fn(&Cohort<SecAggParticipant>, Id) -> Option<Arc<dyn StatementSigner>>;
    let keep: Signer = &|_, _| None;
    let foreign: Signer = &|_, j| Some(Arc::new(other_ca().signer(&format!("p{j}"))));
    let sybil: Signer = &|_, _| Some(Arc::new(ca().signer("p5")));
    let cases: [(&str, Signer, Id, &str); 3] = [
        ("kept signatures", keep, 1, "the signature does not verify"),
        (
            "a certificate from another CA",
            foreign,
            1,
            "certificate refused",
        ),
        // The first sybil entry (1) passes: p5's real entry comes later.
        (
            "sybils of p5",
            sybil,
            2,
            "identity p5 is also used by participant 1",
        ),
    ];
    for (what, signer, refused_at, cause) in cases {
        let mut c = cohort(N);
        ok(c.setup_stage(&c.ids()));
        let victims = first_neighbours(&c, TARGET);
        assert_eq!(victims, [1, 2, 3, 4]);
        let (keys, fakes) = c.substituted_keys(TARGET, &victims, signer);
        let err = c
            .send(TARGET, SecAggDownload::NeighbourKeys { keys })
            .expect_err(what);
        assert_refused_keys(&c, TARGET, &err, refused_at, cause, &fakes);
        assert_eq!(
            exploit_substitution(&mut c, TARGET, &fakes, &[]),
            Recovery::NoMaskedInput { shares: 0 },
            "{what}"
        );
        assert_eq!(c.sent(TARGET), [KEYS], "{what}");
        c.assert_errors_clean();
    }
}

/// Attack 1 signed with certificates the deployment CA issued a second
/// time for the substituted neighbours' own identities (p1 … p4); the
/// target accepts or refuses, then the coordinator presses on.
fn reissued_certificate_attack(
    mut c: Cohort<SecAggParticipant>,
) -> (
    Cohort<SecAggParticipant>,
    Result<(), ProtocolError>,
    Recovery,
) {
    ok(c.setup_stage(&c.ids()));
    let victims = first_neighbours(&c, TARGET);
    let (keys, fakes) = c.substituted_keys(TARGET, &victims, |_, j| {
        Some(Arc::new(ca().signer(&format!("p{j}"))))
    });
    let accepted = c.send(TARGET, SecAggDownload::NeighbourKeys { keys });
    let recovery = exploit_substitution(&mut c, TARGET, &fakes, &[]);
    (c, accepted, recovery)
}

/// FINDING, attack 1 with re-issued certificates: nothing binds participant
/// id `j` to identity `p<j>` but the CA. A certificate the deployment CA
/// issues again for `p1` (new key) is, to a verifier without an allow
/// list, as good as p1's own: the identities in the list stay distinct and
/// every signature verifies. The target accepts the coordinator's keys for
/// t neighbours and the coordinator recovers its input bit for bit. Anyone
/// holding the CA key can do this (in greyfed's PKI, coordinator/src/pki.rs,
/// the CA also issues the coordinator's certificate, so typically the
/// coordinator's operator). That is the documented trust assumption
/// (docs/threat-model.md): this test pins it, so that a change in what a
/// verifier without an allow list accepts is noticed. With a peer allow
/// list it is refused (next test).
#[test]
fn without_an_allow_list_whoever_holds_the_ca_key_can_substitute_keys() {
    let (c, accepted, recovery) = reissued_certificate_attack(cohort(N));
    c.assert_errors_clean();
    assert!(accepted.is_ok(), "{accepted:?}");
    assert_eq!(recovery, Recovery::Unmasked(encoded(TARGET)));
}

/// Attack 1 with re-issued certificates against participants that pin
/// their peers' certificates (an allow list of fingerprints, as
/// `participant`'s `peer_allow_list`): refused, nothing recovered.
#[test]
fn key_substitution_with_reissued_certificates_is_refused_under_an_allow_list() {
    let signers: BTreeMap<Id, Arc<CertificateSigner>> = (0..N as Id)
        .map(|id| (id, Arc::new(ca().signer(&format!("p{id}")))))
        .collect();
    let allow: Vec<(String, String)> = signers
        .iter()
        .map(|(id, s)| (format!("p{id}"), fingerprint(s.credential())))
        .collect();
    let verifier = Arc::new(
        CertificateVerifier::new(ca().ca_pem().as_bytes(), UnixTime::now())
            .unwrap()
            .with_allow_list(allow),
    );
    let c = cohort_with(N, |id| {
        let auth = SecAggAuth {
            signer: signers[&id].clone(),
            verifier: verifier.clone(),
            policy: SecAggPolicy::default(),
        };
        (auth, MODEL)
    });
    let (c, accepted, recovery) = reissued_certificate_attack(c);
    let err = accepted.unwrap_err();
    let cause = "certificate of p1 is not in the allow list";
    assert_refused_keys(&c, TARGET, &err, 1, cause, &BTreeMap::new());
    assert_eq!(recovery, Recovery::NoMaskedInput { shares: 0 });
    c.assert_errors_clean();
}

// ---------------------------------------------------------------------------
// 2. Forged or missing signatures.
// ---------------------------------------------------------------------------

/// Attack 2, forged or missing signatures on a relayed key: neighbour 1's
/// signature with a flipped bit, empty, under an unknown scheme, or
/// neighbour 2's signature in its place. Expected: the target refuses,
/// naming neighbour 1, and seals no share.
#[test]
fn forged_or_missing_signatures_are_refused() {
    type Tamper = fn(&mut [NeighbourKey]);
    let cases: [(&str, Tamper, &str); 4] = [
        (
            "a flipped bit",
            |k| k[0].keys.signature.bytes[10] ^= 1,
            "does not verify",
        ),
        (
            "an empty signature",
            |k| k[0].keys.signature.bytes.clear(),
            "a signature of 0 bytes",
        ),
        (
            "an unknown scheme",
            |k| k[0].keys.signature.scheme = 0xfefe,
            "unsupported signature scheme",
        ),
        (
            "another neighbour's signature",
            |k| k[0].keys.signature = k[1].keys.signature.clone(),
            "does not verify",
        ),
    ];
    for (what, tamper, cause) in cases {
        let mut c = cohort(N);
        ok(c.setup_stage(&c.ids()));
        let mut keys = c.neighbour_keys(TARGET);
        assert_eq!(keys[0].id, 1);
        tamper(&mut keys);
        let err = c
            .send(TARGET, SecAggDownload::NeighbourKeys { keys })
            .expect_err(what);
        assert_refused_keys(&c, TARGET, &err, 1, cause, &BTreeMap::new());
        c.assert_errors_clean();
    }
}

// ---------------------------------------------------------------------------
// 3. Sybil identities.
// ---------------------------------------------------------------------------

/// Attack 3, sybil identities: keys of the coordinator's listed as
/// neighbour 2's, signed with a second certificate the CA issued for "p1"
/// (while p1 itself is listed); listed as neighbour 3's with a certificate
/// for the target's own identity "p0"; or the target's own signed keys
/// reflected back as neighbour 1's. Expected: refused, "also used by".
/// (Neighbour 1's genuine entry listed twice is refused as malformed.)
#[test]
fn sybil_identities_are_refused() {
    type Case = fn(&mut Cohort<SecAggParticipant>, &mut Vec<NeighbourKey>);
    /// Lists keys of the coordinator's as `id`'s, signed by a certificate for `cn`.
    fn replace(c: &mut Cohort<SecAggParticipant>, keys: &mut [NeighbourKey], id: Id, cn: &str) {
        let setup = c.setup.clone();
        let (entry, _) = c.forged_entry(id, &setup, &ca().signer(cn));
        let at = keys.iter().position(|k| k.id == id).unwrap();
        keys[at] = entry;
    }
    let cases: [(&str, Case, Id, &str); 3] = [
        (
            "a second p1 as neighbour 2",
            |c, keys| replace(c, keys, 2, "p1"),
            2,
            "identity p1 is also used by participant 1",
        ),
        (
            "the target's identity as neighbour 3",
            |c, keys| replace(c, keys, 3, "p0"),
            3,
            "identity p0 is also used by participant 0",
        ),
        (
            "the target's own keys as neighbour 1",
            |c, keys| keys[0].keys = c.got.keys[&TARGET].clone(),
            1,
            "identity p0 is also used by participant 0",
        ),
    ];
    for (what, case, refused_at, cause) in cases {
        let mut c = cohort(N);
        ok(c.setup_stage(&c.ids()));
        let mut keys = c.neighbour_keys(TARGET);
        case(&mut c, &mut keys);
        let err = c
            .send(TARGET, SecAggDownload::NeighbourKeys { keys })
            .expect_err(what);
        assert_refused_keys(&c, TARGET, &err, refused_at, cause, &BTreeMap::new());
        c.assert_errors_clean();
    }
    let mut c = cohort(N);
    ok(c.setup_stage(&c.ids()));
    let mut keys = c.neighbour_keys(TARGET);
    keys.insert(1, keys[0].clone());
    let err = c
        .send(TARGET, SecAggDownload::NeighbourKeys { keys })
        .unwrap_err();
    assert!(
        matches!(&err, ProtocolError::Malformed(t) if t.contains("neighbour 1 listed twice")),
        "{err}"
    );
    assert_eq!(c.sent(TARGET), [KEYS]);
    c.assert_errors_clean();
}

// ---------------------------------------------------------------------------
// 4. Per-participant setups.
// ---------------------------------------------------------------------------

/// Attack 4, a setup for the target that differs from everyone else's: in
/// the graph order, the threshold (`t + 1`, still valid on its own) or the
/// encoding (another weight bound, hence another ring). Each participant
/// signs the digest of the setup it got, so the neighbours' signatures fail
/// at the target and the target's at every neighbour. Expected: the target
/// accepts the setup on its own, then everyone refuses at stage 2 (Crypto,
/// "the signature does not verify") before sealing a share.
#[test]
fn per_participant_setups_are_refused() {
    type Change = fn(&mut RoundSetup);
    let cases: [(&str, Change); 3] = [
        ("another graph order", |s| s.graph_order.reverse()),
        ("another threshold", |s| s.threshold += 1),
        ("another encoding", |s| {
            s.encoding = EncodingParams::new(CLIP, BITS, MAX_WEIGHT / 2, N).unwrap()
        }),
    ];
    for (what, change) in cases {
        let mut c = cohort(N);
        let mut theirs = c.setup.clone();
        change(&mut theirs);
        assert_ne!(theirs, c.setup);
        c.send(TARGET, SecAggDownload::Setup(theirs)).unwrap();
        ok(c.setup_stage(&others(&c)));
        let errs = c.keys_stage(&c.ids());
        assert_split_refused(&c, &errs, what);
        c.assert_errors_clean();
    }
}

// ---------------------------------------------------------------------------
// 5. Cohort and threshold floors.
// ---------------------------------------------------------------------------

/// Attack 5, round parameters below the participant's floors: (a) the
/// issue's finding, a cohort of two (`n = 2, k = 1, t = 1` with a made-up
/// second member), where either participant would read the other's update
/// from the next global model; (b) a sparse graph (`k = 2` over 7); (c) a
/// threshold below the one the target's own policy computes
/// (`threshold_for` with its bounds); (d) `t <= k/2`. Expected: the setup
/// is refused (InvalidConfig naming the floor) and the target sends
/// nothing at all, not even keys.
#[test]
fn setups_below_the_floors_are_refused() {
    let base = cohort(N).setup;
    assert_eq!((base.degree, base.threshold), (6, 4));
    // A stricter policy: fewer dropouts planned for, more corruption feared.
    let (delta, gamma) = (0.05, 0.4);
    let strict = SecAggPolicy {
        max_dropout_fraction: delta,
        corrupt_fraction: gamma,
        ..SecAggPolicy::default()
    };
    let needed = threshold_for(N, 6, delta, gamma);
    assert!(needed > 4, "the strict policy needs t = {needed}");
    let cases = [
        (
            "a cohort of two",
            RoundSetup {
                graph_order: vec![TARGET, 1000],
                degree: 1,
                threshold: 1,
                encoding: update_encoding(2),
                ..base.clone()
            },
            SecAggPolicy::default(),
            "the round's cohort has 2 participants, this participant requires at least 3"
                .to_string(),
        ),
        (
            "a sparse graph",
            RoundSetup {
                degree: 2,
                threshold: 2,
                ..base.clone()
            },
            SecAggPolicy::default(),
            "the round's graph degree k = 2 is below the k = 6".to_string(),
        ),
        (
            "a threshold below the target's",
            base.clone(),
            strict,
            format!("the round's threshold t = 4 is below the t = {needed}"),
        ),
        (
            "t <= k/2",
            RoundSetup {
                threshold: 3,
                ..base.clone()
            },
            SecAggPolicy::default(),
            "unsafe graph parameters".to_string(),
        ),
    ];
    for (what, setup, policy, cause) in cases {
        let mut c = cohort_with(N, |id| {
            let p = if id == TARGET {
                policy.clone()
            } else {
                SecAggPolicy::default()
            };
            (ca().auth(&format!("p{id}"), p), MODEL)
        });
        let err = c.send(TARGET, SecAggDownload::Setup(setup)).unwrap_err();
        assert!(
            matches!(&err, ProtocolError::InvalidConfig(t) if t.contains(&cause)),
            "{what}: {err}"
        );
        assert_eq!(c.members[&TARGET].stage(), ParticipantStage::Poisoned);
        assert!(
            c.sent(TARGET).is_empty(),
            "{what}: the target sent {:?}",
            c.sent(TARGET)
        );
        assert_eq!(
            c.recover(TARGET, &c.setup, &BTreeMap::new(), &[]),
            Recovery::NoMaskedInput { shares: 0 }
        );
        c.assert_errors_clean();
    }
}

/// Attack 5, continued: padding a tiny cohort to the floor with made-up
/// members (`[0, 1000, 1001]`, `k = 2`, `t = 2`). The setup passes the
/// floor, so the target advertises its keys; but at stage 2 the made-up
/// members need certified, distinct identities. With certificates from
/// another CA, or with one corrupt participant's certificate (p1) for
/// both, the target refuses before sealing a share.
#[test]
fn a_cohort_padded_with_made_up_members_is_refused() {
    type Signer = fn(&Cohort<SecAggParticipant>, Id) -> Arc<dyn StatementSigner>;
    let cases: [(&str, Signer, Id, &str); 2] = [
        (
            "certificates from another CA",
            |_, id| Arc::new(other_ca().signer(&format!("p{id}"))),
            1000,
            "certificate refused",
        ),
        (
            "p1's certificate for both",
            |c, _| c.auths[&1].signer.clone(),
            1001,
            "identity p1 is also used by participant 1000",
        ),
    ];
    for (what, signer, refused_at, cause) in cases {
        let mut c = cohort(3);
        let padded = RoundSetup {
            graph_order: vec![TARGET, 1000, 1001],
            ..c.setup.clone()
        };
        assert_eq!((padded.degree, padded.threshold), (2, 2));
        c.send(TARGET, SecAggDownload::Setup(padded.clone()))
            .unwrap();
        assert_eq!(
            c.sent(TARGET),
            [KEYS],
            "{what}: the padded setup passes the floor"
        );
        let keys = [1000, 1001]
            .map(|id| {
                let s = signer(&c, id);
                c.forged_entry(id, &padded, &*s).0
            })
            .to_vec();
        let err = c
            .send(TARGET, SecAggDownload::NeighbourKeys { keys })
            .expect_err(what);
        assert_refused_keys(&c, TARGET, &err, refused_at, cause, &BTreeMap::new());
        c.assert_errors_clean();
    }
}

/// FINDING, attack 5 at stage 4: the survivor-set floor (`min_cohort`, 3 by
/// default) counts the ids the coordinator announces, including ids that
/// are not in the round at all. In a cohort of 3 where participant 2
/// dropped after sharing its keys, the honest survivor set `{0, 1}` is
/// refused, but `{0, 1, 1000}` is signed by both and both reveal their
/// shares: the coordinator unmasks `x0 + x1`, a sum of two inputs, which
/// the floor exists to forbid (each of the two reads the other's update
/// from the next global model; a coordinator colluding with 1 reads 0's).
#[test]
fn a_survivor_set_padded_with_made_up_ids_is_refused() {
    let through_stage_3 = || {
        let mut c = cohort(3);
        let ids = c.ids();
        assert_eq!((c.setup.degree, c.setup.threshold), (2, 2));
        ok(c.setup_stage(&ids));
        ok(c.keys_stage(&ids));
        ok(c.shares_stage(&ids));
        c
    };
    // Control: the true survivor set {0, 1} is below the floor.
    let mut c = through_stage_3();
    let err = c
        .send(
            0,
            SecAggDownload::SurvivorSet {
                survivors: vec![0, 1],
            },
        )
        .unwrap_err();
    assert!(err.to_string().contains("requires at least 3"), "{err}");
    // The attack: 2's masked input is dropped, {0, 1} padded with 1000.
    let mut c = through_stage_3();
    let signed = c.survivors_stage(&[0, 1], &[0, 1, 1000]);
    let revealed = c.unmask_stage(&[0, 1], &[0, 1]);
    let sum = c.unmasked_sum(&[0, 1]);
    c.assert_errors_clean();
    assert!(
        sum.is_err(),
        "refusals: {signed:?} {revealed:?}; the coordinator unmasked the sum of 0's and 1's \
         inputs alone (equal to x0 + x1: {})",
        sum == Ok(expected_sum(&c, &[0, 1]))
    );
}

// ---------------------------------------------------------------------------
// 6, 7. Session level: repeated evaluation, replayed training.
// ---------------------------------------------------------------------------

fn session_info() -> SessionInfo {
    SessionInfo {
        session_id: SESSION,
        model: ModelSpec::blocknet_28x28(4),
        training: TrainingConfig::default(),
        rounds: 3,
        aggregation: AggregationKind::SecAgg { full: false },
    }
}

fn classes() -> usize {
    session_info().model.num_classes() as usize
}

fn hello() -> Hello {
    Hello {
        protocol_version: PROTOCOL_VERSION,
        train_samples: 10,
        test_samples: 16,
        image_size: (28, 28),
        classes: (0..classes()).map(|c| c.to_string()).collect(),
        cipher: None,
    }
}

/// A model of 4 parameters.
fn tiny_model() -> ModelWeights {
    ModelWeights::new(vec![
        NamedTensor::new("w", vec![3], vec![0.25; 3]).unwrap(),
        NamedTensor::new("b", vec![1], vec![0.0]).unwrap(),
    ])
    .unwrap()
}

/// Participant `id`'s evaluation: `10 + id` test samples (the weight).
fn metrics(id: Id) -> EvalMetrics {
    let count = 10 + u64::from(id);
    let correct = 5 + u64::from(id) / 2;
    let mut confusion = vec![0; classes() * classes()];
    confusion[0] = correct;
    confusion[1] = count - correct;
    EvalMetrics {
        loss_sum: 0.75 * (f64::from(id) + 1.0),
        correct,
        count,
        confusion,
    }
}

/// Participant `id`'s training update for the 4-parameter model (`±c`).
fn session_update(id: Id) -> Vec<f32> {
    input(id).0[..4].to_vec()
}

/// The context and honest setup of a secure sum of `sum` in `round` over
/// `members` about `model`, as the coordinator's session builds them.
fn sum_setup(
    round: u32,
    sum: SumKind,
    members: &[Id],
    model: &ModelWeights,
) -> (RoundContext, RoundSetup) {
    let n = members.len();
    let (elements, encoding) = match sum {
        SumKind::Update => (model.num_parameters() + 1, update_encoding(n)),
        SumKind::Evaluation => (
            EvalMetrics::sum_len(classes()) + 1,
            EncodingParams::new(1.0, 24, MAX_WEIGHT, n).unwrap(),
        ),
    };
    let ctx = RoundContext {
        session_id: SESSION,
        round,
        sum,
    };
    (
        ctx,
        honest_setup(round, members, encoding, elements, model.digest()),
    )
}

/// `n` participant sessions (ids `0..n`, credentials `p<id>`) admitted to
/// a securely aggregating session; the cohort's sum is `sum` of `round`
/// about `model`.
fn sessions(
    n: usize,
    round: u32,
    sum: SumKind,
    model: &ModelWeights,
) -> Cohort<ParticipantSession> {
    let ids: Vec<Id> = (0..n as Id).collect();
    let (mut members, mut auths, mut rngs) = (BTreeMap::new(), BTreeMap::new(), BTreeMap::new());
    for &id in &ids {
        let auth = auth(id);
        let mut rng = StdRng::seed_from_u64(u64::from(id) + 100);
        let mut s = ParticipantSession::new(hello()).with_secagg_auth(auth.clone());
        assert!(matches!(s.poll_transmit(), Some(Message::Hello(_))));
        let welcome = Message::Welcome {
            participant_id: id,
            session: session_info(),
            model: None,
        };
        s.handle_message(welcome, &mut rng).unwrap();
        assert!(matches!(
            s.poll_event(),
            Some(ParticipantEvent::Joined { .. })
        ));
        members.insert(id, s);
        auths.insert(id, auth);
        rngs.insert(id, rng);
    }
    let (ctx, setup) = sum_setup(round, sum, &ids, model);
    Cohort::new(members, auths, rngs, ctx, setup)
}

impl Cohort<ParticipantSession> {
    /// Delivers a session-level message to `id`: the result and the events.
    fn session_message(
        &mut self,
        id: Id,
        msg: Message,
    ) -> (Result<(), ProtocolError>, Vec<ParticipantEvent>) {
        let s = self.members.get_mut(&id).unwrap();
        let result = s.handle_message(msg, self.rngs.get_mut(&id).unwrap());
        let events = std::iter::from_fn(|| s.poll_event()).collect();
        if let Err(e) = &result {
            self.errors.push((id, e.clone()));
        }
        (result, events)
    }

    /// `id` is asked to evaluate `model` for `round` and reports its metrics.
    fn evaluate(&mut self, id: Id, round: u32, model: &ModelWeights) -> Result<(), ProtocolError> {
        let (result, events) = self.session_message(id, evaluate_request(round, model));
        result?;
        assert!(
            matches!(events[..], [ParticipantEvent::Evaluate { round: r, .. }] if r == round),
            "{events:?}"
        );
        let s = self.members.get_mut(&id).unwrap();
        s.submit_evaluation(round, metrics(id), self.rngs.get_mut(&id).unwrap())
    }

    /// `id` is asked to train from `model` for `round` and reports its update.
    fn train(&mut self, id: Id, round: u32, model: &ModelWeights) -> Result<(), ProtocolError> {
        let (result, events) = self.session_message(id, train_request(round, model));
        result?;
        assert!(
            matches!(events[..], [ParticipantEvent::Train { round: r, .. }] if r == round),
            "{events:?}"
        );
        let s = self.members.get_mut(&id).unwrap();
        s.submit_update(
            round,
            0.5,
            session_update(id),
            10.0,
            self.rngs.get_mut(&id).unwrap(),
        )
    }

    /// Asserts that `id`'s session left (poisoned) and sends nothing more.
    #[track_caller]
    fn assert_left(&mut self, id: Id) {
        let s = self.members.get_mut(&id).unwrap();
        assert!(s.is_finished(), "participant {id} stays in the session");
        assert!(
            s.poll_transmit().is_none(),
            "participant {id} sent something"
        );
        assert!(s.poll_event().is_none());
    }
}

fn evaluate_request(round: u32, model: &ModelWeights) -> Message {
    Message::EvaluateRequest {
        sealed: None,
        round,
        global: greyfed_protocol::GlobalModel::Weights(Arc::new(model.clone())),
    }
}

fn train_request(round: u32, model: &ModelWeights) -> Message {
    Message::TrainRequest {
        evaluates: None,
        sealed: None,
        round,
        global: GlobalModel::Weights(Arc::new(model.clone())),
        seed: 7,
    }
}

/// The sample-weighted mean of `ids`' evaluation-sum inputs and their total weight.
fn eval_mean(ids: &[Id]) -> (Vec<f64>, u64) {
    let mut acc = vec![0.0; EvalMetrics::sum_len(classes())];
    let mut total = 0;
    for &id in ids {
        let (values, weight) = metrics(id).sum_input().unwrap();
        for (a, v) in acc.iter_mut().zip(values) {
            *a += weight as f64 * f64::from(v);
        }
        total += weight;
    }
    (acc.into_iter().map(|a| a / total as f64).collect(), total)
}

/// Attack 6, a second evaluation of one round: after a complete secure
/// evaluation sum of round 1 over 5 sessions, the coordinator asks for
/// another (to get a sum over a different set of evaluators and difference
/// the two), by re-running the sum (a second `Setup`) and by a second
/// `EvaluateRequest` for round 1. Expected: the finished sum refuses the
/// Setup (UnexpectedMessage), the session refuses the request
/// (`RepeatedEvaluation`) and leaves; nothing more is sent.
#[test]
fn a_second_evaluation_of_a_round_is_refused() {
    let model = tiny_model();
    let mut c = sessions(5, 1, SumKind::Evaluation, &model);
    let ids = c.ids();
    for &id in &ids {
        c.evaluate(id, 1, &model).unwrap();
    }
    let all = c.run_honestly();
    let sum = c.unmasked_sum(&all).unwrap();
    let (mean, total) = decode(&c.setup.encoding, &sum).unwrap();
    let (exact, weight) = eval_mean(&all);
    assert_eq!(total, weight);
    let step = f64::from(c.setup.encoding.step());
    for (k, (got, want)) in mean.iter().zip(&exact).enumerate() {
        assert!(
            (f64::from(*got) - want).abs() <= step * 1.01 + 1e-6,
            "element {k}"
        );
    }
    let sent = c.sent.clone();
    for &id in &ids {
        let err = c
            .send(id, SecAggDownload::Setup(c.setup.clone()))
            .unwrap_err();
        assert!(
            matches!(err, ProtocolError::UnexpectedMessage { .. }),
            "{err}"
        );
        let (result, events) = c.session_message(id, evaluate_request(1, &model));
        assert_eq!(result, Err(ProtocolError::RepeatedEvaluation { round: 1 }));
        assert!(
            events.is_empty(),
            "no second evaluation started: {events:?}"
        );
        c.assert_left(id);
    }
    assert_eq!(c.sent, sent, "nothing uploaded after the first sum");
    c.assert_errors_clean();
}

/// Attack 7, a replayed training round: after round 1's secure update sum
/// completed over 5 sessions, the coordinator re-runs that sum (a second
/// `Setup`) and replays round 1's `TrainRequest` (a second update sum of
/// the same round over another cohort could be differenced with the
/// first). Expected: the finished sum refuses the Setup, the session
/// refuses the request (`WrongRound`) and leaves; no Train event, nothing
/// sent.
#[test]
fn a_replayed_training_round_is_refused() {
    let model = tiny_model();
    let mut c = sessions(5, 1, SumKind::Update, &model);
    let ids = c.ids();
    for &id in &ids {
        c.train(id, 1, &model).unwrap();
    }
    let all = c.run_honestly();
    let mut expected = vec![0u32; model.num_parameters() + 1];
    for &id in &all {
        for (e, v) in expected
            .iter_mut()
            .zip(exact_encoding(&session_update(id), 10))
        {
            *e += v;
        }
    }
    assert_eq!(c.unmasked_sum(&all).unwrap(), expected);
    let sent = c.sent.clone();
    for &id in &ids {
        let err = c
            .send(id, SecAggDownload::Setup(c.setup.clone()))
            .unwrap_err();
        assert!(
            matches!(err, ProtocolError::UnexpectedMessage { .. }),
            "{err}"
        );
        let (result, events) = c.session_message(id, train_request(1, &model));
        assert_eq!(
            result,
            Err(ProtocolError::WrongRound { current: 1, got: 1 })
        );
        assert!(events.is_empty(), "no second training started: {events:?}");
        c.assert_left(id);
    }
    assert_eq!(c.sent, sent, "nothing uploaded after the first sum");
    c.assert_errors_clean();
}

/// FINDING, attack 6 across rounds: the once-per-round rule is keyed on the
/// round number only. The coordinator evaluates model M in round 1 with
/// all 5 participants, then sends the same M as round 2's model to all but
/// the target; each accepts (a new round) and reports the same metrics.
/// The difference of the two secure sums is the target's evaluation
/// (accuracy, loss, confusion counts, test-set size), which the
/// `RepeatedEvaluation` rule means to keep from the coordinator. (The same
/// differencing works on training updates: the coordinator also picks the
/// shuffling seed.)
#[test]
fn the_same_model_evaluated_again_in_a_later_round_is_refused() {
    let model = tiny_model();
    let mut c = sessions(5, 1, SumKind::Evaluation, &model);
    for id in c.ids() {
        c.evaluate(id, 1, &model).unwrap();
    }
    let all = c.run_honestly();
    let first = c.unmasked_sum(&all).unwrap();
    let encoding = c.setup.encoding;
    let rest: Vec<Id> = all.iter().copied().filter(|&id| id != TARGET).collect();
    let (ctx, setup) = sum_setup(2, SumKind::Evaluation, &rest, &model);
    c.begin_sum(ctx, setup);
    for &id in &rest {
        if let Err(e) = c.evaluate(id, 2, &model) {
            // Refused: the attack failed.
            assert!(c.errors.iter().any(|(_, x)| *x == e));
            return;
        }
    }
    c.run_honestly();
    let second = c.unmasked_sum(&rest).unwrap();
    // Both sums are exact integers below 2^31: their difference is the
    // target's encoded input.
    let difference: Vec<u32> = first.iter().zip(&second).map(|(a, b)| a - b).collect();
    let (values, weight) = decode(&encoding, &difference).unwrap();
    let (truth, samples) = metrics(TARGET).sum_input().unwrap();
    // Within a few quantisation steps (2 / (2^24 - 1) each) and f32 roundings.
    let exact = weight == samples && values.iter().zip(&truth).all(|(v, t)| (v - t).abs() < 1e-5);
    c.assert_errors_clean();
    assert!(
        !exact,
        "the coordinator read participant {TARGET}'s evaluation: {weight} test samples, \
         accuracy {:.3}, mean loss {:.3}",
        (values[0] + 1.0) / 2.0,
        (values[1] + 1.0) / 2.0 * MAX_EVAL_LOSS as f32
    );
}

// ---------------------------------------------------------------------------
// 8. Different models.
// ---------------------------------------------------------------------------

/// Attack 8, different models for different participants (to see how one
/// participant's data reacts to a model of the coordinator's choosing):
/// (a) the target was sent another model, the setup names the common one:
/// refused ("another model"), nothing sent; (b) the coordinator names each
/// participant's own model in its setup: the target accepts, but its setup
/// digest differs from its neighbours', so every signature between them
/// fails and everyone refuses before sealing a share.
#[test]
fn different_models_for_different_participants_are_refused() {
    const OTHER: [u8; 32] = [0x22; 32];
    let given = |id| (auth(id), if id == TARGET { OTHER } else { MODEL });
    let mut c = cohort_with(N, given);
    let err = c
        .send(TARGET, SecAggDownload::Setup(c.setup.clone()))
        .unwrap_err();
    assert!(
        matches!(&err, ProtocolError::InvalidConfig(t) if t.contains("names another model")),
        "{err}"
    );
    assert!(c.sent(TARGET).is_empty());
    assert_eq!(c.members[&TARGET].stage(), ParticipantStage::Poisoned);
    c.assert_errors_clean();

    let mut c = cohort_with(N, given);
    let theirs = RoundSetup {
        model_digest: OTHER,
        ..c.setup.clone()
    };
    c.send(TARGET, SecAggDownload::Setup(theirs)).unwrap();
    ok(c.setup_stage(&others(&c)));
    let errs = c.keys_stage(&c.ids());
    assert_split_refused(&c, &errs, "own models");
    c.assert_errors_clean();
}

// ---------------------------------------------------------------------------
// 9. The consistency check.
// ---------------------------------------------------------------------------

/// The victim of the consistency-check attacks.
const V: Id = 6;

fn through_masking() -> Cohort<SecAggParticipant> {
    let mut c = cohort(N);
    let ids = c.ids();
    ok(c.setup_stage(&ids));
    ok(c.keys_stage(&ids));
    ok(c.shares_stage(&ids));
    assert!(ids.iter().all(|id| c.got.masked.contains_key(id)));
    c
}

/// Attack 9, the consistency-check attack (Bonawitz et al., round 4): the
/// coordinator shows the target a survivor set without `v`, so that the
/// target reveals its share of `v`'s mask key, while the others see `v` as
/// a survivor and reveal their shares of `v`'s self-mask seed; both secrets
/// would unmask `v`'s input. The target signs what it saw, and is handed
/// the others' signatures over the real set. Expected: the target refuses
/// ("another survivor set") and reveals nothing; the round still completes
/// from the others' shares, and `v`'s input stays masked (the coordinator
/// holds no share of `v`'s mask key).
#[test]
fn a_survivor_set_shown_only_to_the_target_is_caught() {
    let mut c = through_masking();
    let all = c.ids();
    let lie: Vec<Id> = all.iter().copied().filter(|&j| j != V).collect();
    let others = others(&c);
    c.send(
        TARGET,
        SecAggDownload::SurvivorSet {
            survivors: lie.clone(),
        },
    )
    .unwrap();
    ok(c.survivors_stage(&others, &all));
    // The others' signatures, minus v's (not a survivor in the target's set).
    let signatures = c.signatures_for(TARGET, &lie);
    assert!(signatures.len() + 1 >= c.threshold());
    let err = c
        .send(TARGET, SecAggDownload::UnmaskRequest { signatures })
        .unwrap_err();
    assert!(crypto_text(&err).contains("another survivor set"), "{err}");
    assert_eq!(c.members[&TARGET].stage(), ParticipantStage::Poisoned);
    assert_eq!(
        c.sent(TARGET),
        [KEYS, SHARES, MASKED, SIGNED],
        "nothing revealed"
    );
    ok(c.unmask_stage(&others, &others));
    assert_eq!(c.unmasked_sum(&all), Ok(expected_sum(&c, &all)));
    assert!(!c.got.key_shares.contains_key(&V));
    assert_eq!(
        c.recover(V, &c.setup, &BTreeMap::new(), &c.graph.neighbours(V)),
        Recovery::PairwiseMaskHidden {
            with: 0,
            key_shares: 0,
            need: 4
        }
    );
    c.assert_errors_clean();
}

/// Attack 9, coordinated: the coordinator shows "`v` dropped" to a group of
/// `t` participants, who then pass the consistency check among themselves
/// and reveal their shares of `v`'s mask key, and "`v` survived" to the
/// other `k + 1 - t` holders of `v`'s shares (`v` included) to collect its
/// self-mask seed. Expected: the group does reveal `v`'s mask key, but the
/// rest are fewer than `t` and refuse (too few signatures on their set),
/// so `v`'s self-mask seed, and its input, stay hidden: the one-of-two rule
/// with `t > k/2` holds where the consistency check alone would not.
#[test]
fn a_survivor_set_shown_to_a_threshold_group_still_hides_the_victim() {
    let mut c = through_masking();
    let all = c.ids();
    let lie: Vec<Id> = all.iter().copied().filter(|&j| j != V).collect();
    let (group, rest) = ([0, 1, 2, 3], [4, 5, V]);
    assert_eq!(group.len(), c.threshold());
    ok(c.survivors_stage(&group, &lie));
    ok(c.survivors_stage(&rest, &all));
    ok(c.unmask_stage(&group, &group));
    assert_eq!(
        c.got.key_shares[&V].len(),
        4,
        "the group revealed v's mask key"
    );
    let errs = c.unmask_stage(&rest, &rest);
    assert_eq!(errs.len(), 3);
    for (id, err) in &errs {
        assert!(
            matches!(
                err,
                ProtocolError::NotEnoughShares {
                    what: "signature on the survivor set",
                    have: 3,
                    need: 4,
                    ..
                }
            ),
            "participant {id}: {err}"
        );
        assert_eq!(
            c.sent(*id),
            [KEYS, SHARES, MASKED, SIGNED],
            "participant {id}"
        );
    }
    assert!(!c.got.self_mask_shares.contains_key(&V));
    assert_eq!(
        c.recover(V, &c.setup, &BTreeMap::new(), &c.graph.neighbours(V)),
        Recovery::SelfMaskHidden { shares: 0, need: 4 }
    );
    c.assert_errors_clean();
}
