//! Inference: one executor thread per device owning a bounded cache of
//! loaded models (least recently used evicted). HTTP handlers decode images
//! elsewhere and send preprocessed pixels here through a bounded queue; when
//! the queue is full they are told to retry rather than grow memory.

use std::path::PathBuf;
use std::sync::mpsc as std_mpsc;
use std::time::Instant;

use anyhow::Context;
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};
use tokio::sync::oneshot;
use uuid::Uuid;

use super::backbone::{features, Backbone};
use super::checkpoint::load_vars;
use super::device::device_name;
use super::training::InputSpec;
use crate::data::loader::normalise;

/// Which model to run, as the executor needs to rebuild it.
#[derive(Debug, Clone)]
pub struct ModelHandle {
    pub id: Uuid,
    pub backbone: Backbone,
    pub input: InputSpec,
    /// Number of classes of a classifier; `None` for an encoder.
    pub num_classes: Option<usize>,
    pub weights: PathBuf,
}

/// What to compute.
#[derive(Debug, Clone, Copy)]
pub enum InferenceTask {
    Embed,
    Classify,
}

/// Per-image results.
#[derive(Debug)]
pub enum InferenceOutput {
    Embeddings(Vec<Vec<f32>>),
    /// Softmax probabilities, one row per image, in class order.
    Probabilities(Vec<Vec<f32>>),
}

enum Message {
    Run {
        model: ModelHandle,
        task: InferenceTask,
        /// Each image `C×S×S` uint8, already at the model's input size.
        images: Vec<Vec<u8>>,
        reply: oneshot::Sender<anyhow::Result<InferenceOutput>>,
        enqueued: Instant,
    },
    Evict(Uuid),
}

/// Why a request did not run.
#[derive(Debug, thiserror::Error)]
pub enum InferenceError {
    #[error("the inference queue is full")]
    Busy,
    #[error("the inference executor has stopped")]
    Stopped,
    #[error(transparent)]
    Failed(#[from] anyhow::Error),
}

/// The async side's handle to the executor thread.
#[derive(Clone)]
pub struct InferenceExecutor {
    queue: std_mpsc::SyncSender<Message>,
    device: Device,
}

struct LoadedModel {
    id: Uuid,
    _vs: nn::VarStore,
    trunk: nn::FuncT<'static>,
    head: Option<nn::Linear>,
}

fn load_model(handle: &ModelHandle, device: Device) -> anyhow::Result<LoadedModel> {
    let vs = nn::VarStore::new(device);
    let root = vs.root();
    let trunk = handle.backbone.build(&root, handle.input.channels as i64);
    let head = handle.num_classes.map(|k| {
        nn::linear(
            &root / "fc",
            handle.backbone.feature_dim(),
            k as i64,
            Default::default(),
        )
    });
    load_vars(&vs, &handle.weights, |_| true)
        .with_context(|| format!("Failed to load model {}", handle.id))?;
    Ok(LoadedModel {
        id: handle.id,
        _vs: vs,
        trunk,
        head,
    })
}

fn run(
    model: &LoadedModel,
    handle: &ModelHandle,
    task: InferenceTask,
    images: &[Vec<u8>],
    device: Device,
) -> anyhow::Result<InferenceOutput> {
    let size = handle.input.image_size as i64;
    let channels = handle.input.channels as i64;
    let flat: Vec<u8> = images.concat();
    let batch = Tensor::from_slice(&flat).view([images.len() as i64, channels, size, size]);
    let xs = normalise(&batch, &handle.input.mean, &handle.input.std, device);
    tch::no_grad(|| {
        let feats = features(&model.trunk, &xs, false);
        let rows = match task {
            InferenceTask::Embed => feats,
            InferenceTask::Classify => {
                let head = model
                    .head
                    .as_ref()
                    .context("the model has no classification head")?;
                head.forward(&feats).softmax(-1, Kind::Float)
            }
        };
        let rows = rows.to_kind(Kind::Float).to_device(Device::Cpu);
        let out: Vec<Vec<f32>> = Vec::<Vec<f32>>::try_from(rows)?;
        Ok(match task {
            InferenceTask::Embed => InferenceOutput::Embeddings(out),
            InferenceTask::Classify => InferenceOutput::Probabilities(out),
        })
    })
}

fn executor_loop(rx: std_mpsc::Receiver<Message>, device: Device, cache_size: usize) {
    let mut cache: Vec<LoadedModel> = Vec::new();
    while let Ok(message) = rx.recv() {
        match message {
            Message::Evict(id) => cache.retain(|m| m.id != id),
            Message::Run {
                model,
                task,
                images,
                reply,
                enqueued,
            } => {
                crate::telemetry::observe_inference_queued(images.len(), enqueued.elapsed());
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    let position = match cache.iter().position(|m| m.id == model.id) {
                        Some(p) => p,
                        None => {
                            let loaded = load_model(&model, device)?;
                            if cache.len() >= cache_size.max(1) {
                                cache.remove(0);
                            }
                            cache.push(loaded);
                            cache.len() - 1
                        }
                    };
                    // Most recently used last.
                    let loaded = cache.remove(position);
                    let started = Instant::now();
                    let result = run(&loaded, &model, task, &images, device);
                    crate::telemetry::observe_inference_compute(started.elapsed());
                    cache.push(loaded);
                    result
                }))
                .unwrap_or_else(|_| Err(anyhow::anyhow!("inference panicked")));
                let _ = reply.send(result);
            }
        }
    }
}

/// Requests waiting for the executor before new ones are refused.
const QUEUE_DEPTH: usize = 64;

impl InferenceExecutor {
    /// Starts the executor thread on `device`.
    pub fn start(device: Device, cache_size: usize) -> anyhow::Result<Self> {
        let (tx, rx) = std_mpsc::sync_channel(QUEUE_DEPTH);
        std::thread::Builder::new()
            .name(format!("pretext-infer-{}", device_name(device)))
            .spawn(move || executor_loop(rx, device, cache_size))
            .context("Failed to start the inference thread")?;
        Ok(Self { queue: tx, device })
    }

    /// The device models run on.
    pub fn device(&self) -> Device {
        self.device
    }

    /// Runs `task` on preprocessed images.
    pub async fn run(
        &self,
        model: ModelHandle,
        task: InferenceTask,
        images: Vec<Vec<u8>>,
    ) -> Result<InferenceOutput, InferenceError> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .try_send(Message::Run {
                model,
                task,
                images,
                reply,
                enqueued: Instant::now(),
            })
            .map_err(|e| match e {
                std_mpsc::TrySendError::Full(_) => InferenceError::Busy,
                std_mpsc::TrySendError::Disconnected(_) => InferenceError::Stopped,
            })?;
        Ok(answer.await.map_err(|_| InferenceError::Stopped)??)
    }

    /// Drops a model from the cache (after it was deleted).
    pub fn evict(&self, id: Uuid) {
        let _ = self.queue.try_send(Message::Evict(id));
    }
}
