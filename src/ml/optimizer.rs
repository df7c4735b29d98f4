//! AdamW over LibTorch tensors, with a state that can be saved and restored.
//!
//! `tch::nn::AdamW` keeps its moments and step count inside LibTorch's C++
//! optimizer, which tch can neither read nor write: a job resumed from a
//! checkpoint would start them again from zero and train differently from one
//! that never stopped. This optimizer keeps them as tensors named after the
//! variables they belong to, so a checkpoint holds them beside the weights.
//!
//! The maths are PyTorch's `torch.optim.AdamW` (decoupled weight decay,
//! bias-corrected moments, no AMSGrad) and its defaults (betas 0.9 and
//! 0.999, eps 1e-8), done in place on each variable. tch binds neither the
//! fused nor the multi-tensor (`_foreach`) AdamW kernels, so each variable
//! takes a handful of element-wise ops, as LibTorch's own C++ AdamW does.

use std::collections::HashMap;

use anyhow::{bail, Context};
use tch::nn::VarStore;
use tch::{Device, Tensor};

/// PyTorch's default decay rate of the first moment.
const BETA1: f64 = 0.9;
/// PyTorch's default decay rate of the second moment.
const BETA2: f64 = 0.999;
/// PyTorch's default term added to the denominator.
const EPS: f64 = 1e-8;

/// Name of the step count in a saved state.
const STEP_KEY: &str = "step";
/// Prefix of a variable's first moment in a saved state.
const FIRST_MOMENT: &str = "exp_avg.";
/// Prefix of a variable's second moment in a saved state.
const SECOND_MOMENT: &str = "exp_avg_sq.";

/// A trainable variable and its moments.
struct Slot {
    name: String,
    var: Tensor,
    group: usize,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

/// AdamW over the trainable variables of a [`VarStore`].
pub struct AdamW {
    slots: Vec<Slot>,
    /// The learning rate of each variable group (`nn::Path::set_group`).
    learning_rates: Vec<f64>,
    weight_decay: f64,
    /// Optimizer steps taken, for the bias correction.
    step: i64,
}

impl AdamW {
    /// An optimizer for the variables of `vs` that are trainable and
    /// require gradients now (a frozen trunk is left out), every group
    /// starting at `learning_rate`.
    pub fn new(vs: &VarStore, learning_rate: f64, weight_decay: f64) -> anyhow::Result<Self> {
        let variables = vs
            .variables_
            .lock()
            .map_err(|_| anyhow::anyhow!("the variable store's lock is poisoned"))?;
        let names: HashMap<usize, &String> = variables
            .named_variables
            .iter()
            .map(|(name, t)| (t.data_ptr() as usize, name))
            .collect();
        let mut slots = Vec::new();
        for trainable in &variables.trainable_variables {
            if !trainable.tensor.requires_grad() {
                continue;
            }
            let Some(name) = names.get(&(trainable.tensor.data_ptr() as usize)) else {
                bail!("a trainable variable has no name in its store");
            };
            slots.push(Slot {
                name: (*name).clone(),
                var: trainable.tensor.shallow_clone(),
                group: trainable.group,
                exp_avg: trainable.tensor.zeros_like(),
                exp_avg_sq: trainable.tensor.zeros_like(),
            });
        }
        slots.sort_by(|a, b| a.name.cmp(&b.name));
        let groups = slots.iter().map(|s| s.group + 1).max().unwrap_or(1);
        Ok(Self {
            slots,
            learning_rates: vec![learning_rate; groups],
            weight_decay,
            step: 0,
        })
    }

    /// Sets the learning rate of every group.
    pub fn set_lr(&mut self, learning_rate: f64) {
        self.learning_rates.fill(learning_rate);
    }

    /// Sets the learning rate of one group.
    pub fn set_lr_group(&mut self, group: usize, learning_rate: f64) {
        if let Some(lr) = self.learning_rates.get_mut(group) {
            *lr = learning_rate;
        }
    }

    /// Zeroes the gradients of the optimized variables.
    pub fn zero_grad(&mut self) {
        for slot in &mut self.slots {
            slot.var.zero_grad();
        }
    }

    /// Zeroes the gradients, back-propagates `loss`, and takes a step.
    pub fn backward_step(&mut self, loss: &Tensor) {
        self.zero_grad();
        loss.backward();
        self.step();
    }

    /// One AdamW update of every variable that has a gradient.
    pub fn step(&mut self) {
        self.step += 1;
        let bias_correction1 = 1.0 - BETA1.powf(self.step as f64);
        let bias_correction2_sqrt = (1.0 - BETA2.powf(self.step as f64)).sqrt();
        tch::no_grad(|| {
            for slot in &mut self.slots {
                let grad = slot.var.grad();
                if !grad.defined() {
                    continue;
                }
                let lr = self.learning_rates[slot.group];
                if self.weight_decay != 0.0 {
                    let _ = slot.var.g_mul_scalar_(1.0 - lr * self.weight_decay);
                }
                let _ = slot.exp_avg.lerp_(&grad, 1.0 - BETA1);
                let _ = slot.exp_avg_sq.lerp_(&grad.square(), 1.0 - BETA2);
                let step_size = lr / bias_correction1;
                if step_size == 0.0 {
                    continue;
                }
                // var -= step_size * exp_avg / (sqrt(exp_avg_sq) / bc2 + eps),
                // with the scale folded into the denominator: LibTorch's
                // `addcdiv_` as tch binds it takes no scale of its own.
                let mut denom = slot.exp_avg_sq.sqrt();
                let _ = denom.g_mul_scalar_(-1.0 / (bias_correction2_sqrt * step_size));
                let _ = denom.g_add_scalar_(-EPS / step_size);
                let _ = slot.var.addcdiv_(&slot.exp_avg, &denom);
            }
        });
    }

    /// The state to save: each variable's moments (on the CPU, in the
    /// standard layout) and the step count.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let cpu = |t: &Tensor| t.to_device(Device::Cpu).contiguous();
        let mut state = vec![(STEP_KEY.to_string(), Tensor::from(self.step))];
        for slot in &self.slots {
            state.push((format!("{FIRST_MOMENT}{}", slot.name), cpu(&slot.exp_avg)));
            state.push((
                format!("{SECOND_MOMENT}{}", slot.name),
                cpu(&slot.exp_avg_sq),
            ));
        }
        state
    }

    /// Restores a state saved by [`AdamW::state`] for the same variables.
    pub fn load_state(&mut self, state: &HashMap<String, Tensor>) -> anyhow::Result<()> {
        let step = state
            .get(STEP_KEY)
            .context("the optimizer state has no step count")?;
        let step = i64::try_from(step).context("the optimizer step count is not an integer")?;
        tch::no_grad(|| {
            for slot in &mut self.slots {
                for (prefix, moment) in [
                    (FIRST_MOMENT, &mut slot.exp_avg),
                    (SECOND_MOMENT, &mut slot.exp_avg_sq),
                ] {
                    let key = format!("{prefix}{}", slot.name);
                    let Some(saved) = state.get(&key) else {
                        bail!("the optimizer state lacks `{key}`");
                    };
                    if saved.size() != moment.size() {
                        bail!(
                            "the optimizer state's `{key}` has shape {:?}, the variable {:?}",
                            saved.size(),
                            moment.size()
                        );
                    }
                    moment.copy_(&saved.to_kind(moment.kind()).to_device(moment.device()));
                }
            }
            Ok(())
        })?;
        self.step = step;
        Ok(())
    }

    /// Optimizer steps taken (after a restore, counting those before it).
    pub fn steps_taken(&self) -> i64 {
        self.step
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn::{self, Module, OptimizerConfig};
    use tch::Kind;

    /// A small two-group network, optionally with the weights of another.
    fn network(like: Option<&VarStore>) -> (VarStore, nn::Sequential) {
        let mut vs = VarStore::new(Device::Cpu);
        let root = vs.root();
        let net = nn::seq()
            .add(nn::linear(
                root.set_group(0) / "hidden",
                5,
                8,
                Default::default(),
            ))
            .add_fn(|x| x.relu())
            .add(nn::linear(
                root.set_group(1) / "out",
                8,
                2,
                Default::default(),
            ));
        if let Some(other) = like {
            vs.copy(other).unwrap();
        }
        (vs, net)
    }

    /// A fixed regression problem.
    fn problem() -> (Tensor, Tensor) {
        let xs = Tensor::arange(80, (Kind::Float, Device::Cpu)).view([16, 5]);
        let xs = (xs * 0.37).sin();
        let ys = Tensor::stack(
            &[
                xs.sum_dim_intlist(1, false, Kind::Float),
                xs.square().sum_dim_intlist(1, false, Kind::Float),
            ],
            1,
        );
        (xs, ys)
    }

    fn weights(vs: &VarStore) -> HashMap<String, Tensor> {
        vs.variables()
            .into_iter()
            .map(|(name, t)| (name, t.detach().copy()))
            .collect()
    }

    fn max_difference(a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>) -> f64 {
        a.iter()
            .map(|(name, t)| f64::try_from((t - &b[name]).abs().max()).unwrap())
            .fold(0.0, f64::max)
    }

    fn train(
        (net, xs, ys): (&nn::Sequential, &Tensor, &Tensor),
        optimizer: &mut AdamW,
        steps: usize,
    ) {
        for _ in 0..steps {
            optimizer.set_lr(0.02);
            optimizer.backward_step(&net.forward(xs).mse_loss(ys, tch::Reduction::Mean));
        }
    }

    #[test]
    fn trains_as_libtorch_adamw_does_with_the_same_settings() {
        let (xs, ys) = problem();
        let (vs, net) = network(None);
        let initial = weights(&vs);
        let (theirs_vs, theirs_net) = network(Some(&vs));
        let mut ours = AdamW::new(&vs, 0.01, 0.05).unwrap();
        let mut theirs = nn::AdamW {
            wd: 0.05,
            ..Default::default()
        }
        .build(&theirs_vs, 0.01)
        .unwrap();
        for step in 0..50 {
            let lr = 0.01 * (1.0 - step as f64 / 50.0);
            ours.set_lr_group(1, lr);
            ours.set_lr_group(0, lr * 0.5);
            theirs.set_lr_group(1, lr);
            theirs.set_lr_group(0, lr * 0.5);
            ours.backward_step(&net.forward(&xs).mse_loss(&ys, tch::Reduction::Mean));
            theirs.backward_step(&theirs_net.forward(&xs).mse_loss(&ys, tch::Reduction::Mean));
        }
        let difference = max_difference(&weights(&vs), &weights(&theirs_vs));
        assert!(difference < 1e-5, "weights differ by {difference}");
        let moved = max_difference(&weights(&vs), &initial);
        assert!(moved > 1e-2, "training moved the weights by {moved} only");
    }

    #[test]
    fn a_restored_state_continues_as_if_never_saved() {
        let (xs, ys) = problem();
        let (straight_vs, straight_net) = network(None);
        let (vs, net) = network(Some(&straight_vs));
        let mut straight = AdamW::new(&straight_vs, 0.02, 0.01).unwrap();
        train((&straight_net, &xs, &ys), &mut straight, 20);

        let mut first = AdamW::new(&vs, 0.02, 0.01).unwrap();
        train((&net, &xs, &ys), &mut first, 8);
        let saved: HashMap<String, Tensor> = first.state().into_iter().collect();
        let mut resumed = AdamW::new(&vs, 0.02, 0.01).unwrap();
        resumed.load_state(&saved).unwrap();
        assert_eq!(resumed.steps_taken(), 8);
        train((&net, &xs, &ys), &mut resumed, 12);

        let difference = max_difference(&weights(&straight_vs), &weights(&vs));
        assert_eq!(difference, 0.0, "weights differ by {difference}");
    }

    #[test]
    fn a_frozen_variable_gets_no_moments_and_does_not_move() {
        let (xs, ys) = problem();
        let (vs, net) = network(None);
        let hidden = vs.variables()["hidden.weight"].detach().copy();
        for (name, var) in vs.variables() {
            if name.starts_with("hidden.") {
                let _ = var.set_requires_grad(false);
            }
        }
        let mut optimizer = AdamW::new(&vs, 0.01, 0.1).unwrap();
        train((&net, &xs, &ys), &mut optimizer, 3);
        let names: Vec<String> = optimizer
            .state()
            .into_iter()
            .map(|(name, _)| name)
            .collect();
        assert!(names.iter().all(|n| !n.contains("hidden.")), "{names:?}");
        assert!(
            names.contains(&"exp_avg.out.weight".to_string()),
            "{names:?}"
        );
        assert!(vs.variables()["hidden.weight"].equal(&hidden));
    }
}
