//! Measurements, apart from the training path: how much accuracy the image
//! cipher costs ([`experiment`]), what it hides from an observer
//! ([`security`], with the attacks in [`attack`] and the image-quality
//! metrics in [`quality`]), and what attacks with many images
//! ([`ciphertext_only`], tabulated by [`attack_table`]) and on the model
//! ([`model_attack`]) recover. Participants never run this code; `greyfed
//! experiment`, `greyfed encrypt` and the run report do.

pub mod attack;
pub mod attack_table;
pub mod ciphertext_only;
pub mod experiment;
pub mod model_attack;
pub mod quality;
pub mod security;
