//! LibTorch models and everything that runs them: backbones, the pretext
//! tasks, the training loops for pretraining and fine-tuning, their
//! optimizer, checkpoints, inference, and passes of a model over a whole
//! dataset. Code in here runs only on dedicated
//! OS threads that own their tensors; async code talks to it through channels.

pub mod allocator;
pub mod backbone;
pub mod ceiling;
pub mod checkpoint;
pub mod classifier;
pub mod dataset_inference;
pub mod description;
pub mod device;
pub mod evaluate;
pub mod finetune;
pub mod inference;
pub mod optimizer;
pub mod prefetch;
pub mod pretext;
pub mod pretrain;
pub mod self_training;
pub mod supervised;
pub mod training;
pub mod transfer;
