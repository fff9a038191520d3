//! Admission: a participant's Hello is checked (version, identity, image
//! key, input, sample claims) and, once admitted, it is welcomed into the
//! session (see the module docs of [`super`]).

use super::*;

impl CoordinatorSession {
    /// Why `hello`'s input does not fit the session's model or classes
    /// (naming both sides), or `None`.
    pub(super) fn input_refusal(&self, hello: &Hello) -> Option<String> {
        let input = hello.input();
        if let Some(why) = self.model().and_then(|spec| spec.input_mismatch(&input)) {
            return Some(format!("{why} (cipher {})", hello.cipher_name()));
        }
        match self.classes() {
            Some(classes) if classes != input.classes.as_slice() => Some(format!(
                "the participant's classes {} differ from the session's {}; every \
                 participant needs the same class list (same class folders or labels)",
                input.class_list(),
                crate::message::class_list(classes)
            )),
            _ => None,
        }
    }

    /// The session's model for the first admitted participant's input:
    /// the fixed one (taking its classes when the model names none), or
    /// the factory's.
    pub(super) fn build_model(&mut self, hello: &Hello) -> Result<SessionModel, String> {
        let input = hello.input();
        match &self.initial {
            InitialModel::Fixed { spec, classes, .. } => Ok(SessionModel {
                spec: spec.clone(),
                classes: classes.clone().unwrap_or(input.classes),
            }),
            InitialModel::ForInput(factory) => {
                let (spec, weights) = factory.build(&input).map_err(|e| {
                    format!(
                        "no model can be built for the participant's input ({}x{}, {} \
                         classes): {e}",
                        input.rows,
                        input.cols,
                        input.classes.len()
                    )
                })?;
                if let Some(why) = spec.input_mismatch(&input) {
                    return Err(format!(
                        "the model factory built a model that does not fit: {why}"
                    ));
                }
                weights.validate().map_err(|e| e.to_string())?;
                self.global = Some(Arc::new(weights));
                self.global_digest = None;
                Ok(SessionModel {
                    spec,
                    classes: input.classes,
                })
            }
        }
    }

    pub(super) fn handle_hello(
        &mut self,
        now: Instant,
        from: ParticipantId,
        hello: Hello,
    ) -> Result<(), ProtocolError> {
        if self.peers.contains_key(&from) {
            return Err(ProtocolError::UnexpectedMessage {
                expected: self.phase_expects(),
                got: "Hello",
            });
        }
        let identity = self.identities.get(&from).cloned();
        let refusal = if identity.is_none() {
            Some("the connection has no authenticated identity".to_string())
        } else if hello.protocol_version != PROTOCOL_VERSION {
            Some(
                ProtocolError::VersionMismatch {
                    ours: PROTOCOL_VERSION,
                    theirs: hello.protocol_version,
                }
                .to_string(),
            )
        } else if self.phase == Phase::Over {
            Some("the session is over".to_string())
        } else if let Err(e) = hello.input().validate() {
            Some(format!("the participant's data cannot be trained on: {e}"))
        } else if let Some(reason) = self.input_refusal(&hello) {
            Some(reason)
        } else if hello.train_samples == 0 {
            Some("no training samples".to_string())
        } else {
            match &self.key_fingerprint {
                Some(fp) if fp != hello.key_fingerprint() => Some(format!(
                    "image key fingerprint {:?} differs from the session's {:?}; \
                     all participants must encrypt with the same key (or all use --plain)",
                    hello.key_fingerprint(),
                    fp
                )),
                _ if self.cipher.as_ref().is_some_and(|c| *c != hello.cipher) => Some(format!(
                    "image cipher {} differs from the session's {}; all participants must \
                     encrypt the same way",
                    hello.cipher_name(),
                    self.cipher
                        .as_ref()
                        .and_then(|c| c.as_ref())
                        .map_or_else(|| "plain".to_string(), ToString::to_string)
                )),
                _ => None,
            }
        };
        // The first admitted participant's input builds the model; a model
        // that cannot be built for it refuses the participant like any other
        // misfit.
        let refusal = refusal.or_else(|| match &self.model {
            Some(_) => None,
            None => self
                .build_model(&hello)
                .map(|model| self.model = Some(model))
                .err(),
        });
        if let Some(reason) = refusal {
            self.outbox.push_back((
                from,
                Message::Reject {
                    reason: reason.clone(),
                },
            ));
            self.events
                .push_back(SessionEvent::Rejected { id: from, reason });
            return Ok(());
        }
        let identity = identity.expect("refused above when missing");
        let model = self.model.as_ref().expect("built above").spec.clone();
        // One seat per identity: a newer connection replaces the older one
        // (a participant restarted before its old connection timed out).
        let older: Vec<ParticipantId> = self
            .peers
            .iter()
            .filter(|(_, p)| p.identity == identity)
            .map(|(&id, _)| id)
            .collect();
        for old in older {
            let reason = format!("replaced by a newer connection of {identity}");
            self.outbox.push_back((
                old,
                Message::Reject {
                    reason: reason.clone(),
                },
            ));
            self.events
                .push_back(SessionEvent::Rejected { id: old, reason });
            self.handle_disconnect(now, old);
        }
        self.key_fingerprint
            .get_or_insert_with(|| hello.key_fingerprint().to_string());
        self.cipher.get_or_insert_with(|| hello.cipher.clone());
        // Claims bound aggregation weights: clamp them to the operator's
        // caps (never refuse, never let them break the ring; see
        // `begin_with_weight_bound`).
        let caps = self.config.max_claimed_samples;
        let mut clamped = Vec::new();
        let mut clamp = |field: &'static str, claimed: u64, cap: u64| {
            if claimed > cap {
                clamped.push(SessionEvent::ClaimClamped {
                    id: from,
                    identity: identity.clone(),
                    field,
                    claimed,
                    cap,
                });
            }
            claimed.min(cap)
        };
        let train_samples = clamp("train_samples", hello.train_samples, caps.train);
        let test_samples = clamp("test_samples", hello.test_samples, caps.test);
        // The Welcome carries the current model, which the participant keeps.
        let holds = Some(self.round_global_digest());
        self.peers.insert(
            from,
            Peer {
                identity: identity.clone(),
                train_samples,
                test_samples,
                holds,
                takes_deltas: !self.whole_models.contains(&from),
            },
        );
        self.outbox.push_back((
            from,
            Message::Welcome {
                participant_id: from,
                session: SessionInfo {
                    session_id: self.config.session_id,
                    model,
                    training: self.config.training.clone(),
                    rounds: self.config.rounds,
                    aggregation: self.aggregator.aggregation(),
                },
                model: Some(self.shared_global()),
            },
        ));
        self.events
            .push_back(SessionEvent::Joined { id: from, identity });
        self.events.extend(clamped);
        // A participant admitted while a session runs (e.g. one that
        // reconnected) joins the cohort when the next round starts.
        if self.phase == Phase::Joining && self.peers.len() >= self.config.participants {
            self.start_round(now, self.config.first_round);
        }
        Ok(())
    }
}
