//! Differential-privacy planning for the command line: the table `greyfed
//! dp plan` prints.

use std::fmt::Write as _;

use greyfed_protocol::privacy::{Guarantee, ResolvedPlan};

/// Rounds at which the table shows ε: about ten, always the last.
fn shown_rounds(rounds: u32) -> Vec<u32> {
    let step = rounds.div_ceil(10).max(1);
    let mut shown: Vec<u32> = (1..=rounds).filter(|r| r % step == 0 || *r == 1).collect();
    if shown.last() != Some(&rounds) {
        shown.push(rounds);
    }
    shown
}

/// What `greyfed dp plan` prints: the plan's inputs, ε after selected
/// rounds, and a last line `epsilon=E delta=D noise_multiplier=Z
/// sampling_rate=Q steps=S` for scripts.
///
/// # Errors
/// A plan the accountant refuses (it was resolved, so only on a bug).
pub fn plan_table(plan: &ResolvedPlan) -> anyhow::Result<String> {
    let mut out = String::new();
    let who = match plan.guarantee {
        Guarantee::Record {
            samples,
            batch_size,
            local_epochs,
        } => format!(
            "record-level: {samples} records, expected batch {batch_size}, \
             {local_epochs} local epoch(s) a round"
        ),
        Guarantee::Participant { population, cohort } => format!(
            "participant-level: a cohort of {cohort} drawn from {population} participants a round"
        ),
    };
    writeln!(out, "{who}")?;
    writeln!(
        out,
        "noise multiplier {:.4}, sampling rate {:.6}, {} step(s) a round, delta {:e}",
        plan.noise_multiplier, plan.sampling_rate, plan.steps_per_round, plan.delta
    )?;
    writeln!(out)?;
    writeln!(out, "| round | steps | epsilon |")?;
    writeln!(out, "|---:|---:|---:|")?;
    let mut last = 0.0;
    for round in shown_rounds(plan.rounds) {
        last = plan.epsilon_after(round)?;
        writeln!(
            out,
            "| {round} | {} | {last:.4} |",
            plan.steps_per_round * u64::from(round)
        )?;
    }
    writeln!(out)?;
    write!(
        out,
        "epsilon={last} delta={} noise_multiplier={} sampling_rate={} steps={}",
        plan.delta,
        plan.noise_multiplier,
        plan.sampling_rate,
        plan.steps()
    )?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use greyfed_protocol::privacy::{DpPlan, Noise};

    #[test]
    fn shown_rounds_end_with_the_last() {
        assert_eq!(shown_rounds(1), vec![1]);
        assert_eq!(shown_rounds(5), vec![1, 2, 3, 4, 5]);
        assert_eq!(
            shown_rounds(40),
            vec![1, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40]
        );
        assert_eq!(shown_rounds(13), vec![1, 2, 4, 6, 8, 10, 12, 13]);
    }

    #[test]
    fn the_table_ends_with_the_accountants_epsilon() {
        let plan = DpPlan {
            guarantee: Guarantee::Participant {
                population: 100,
                cohort: 10,
            },
            rounds: 40,
            delta: 1e-5,
            noise: Noise::Multiplier(1.0),
        }
        .resolve()
        .unwrap();
        let table = plan_table(&plan).unwrap();
        let last = table.lines().last().unwrap();
        let eps: f64 = last
            .strip_prefix("epsilon=")
            .and_then(|s| s.split_whitespace().next())
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(eps, plan.epsilon_after(40).unwrap());
        assert!(last.contains("sampling_rate=0.1 steps=40"), "{last}");
        assert!(table.contains("| 40 | 40 |"), "{table}");
    }
}
