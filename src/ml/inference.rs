//! Inference: one executor thread per device owning a bounded cache of
//! loaded models (least recently used evicted), which merges concurrent
//! requests for the same model into one forward pass (dynamic batching).
//! HTTP handlers decode images elsewhere and send preprocessed pixels here;
//! when too many requests wait they are told to retry rather than grow memory.
//!
//! # Batching
//! The executor takes the oldest waiting request, then adds every waiting
//! request for the same model (embed and classify alike: both start with the
//! same trunk forward) until the batch holds `max_batch_size` images. While
//! more requests are still being decoded it waits for them, but never longer
//! than `max_batch_delay` after the first request was queued; with nothing on
//! its way it runs at once, so a lone client pays no delay. A request with
//! more images than `max_batch_size` runs on its own. Requests for another
//! model wait for the next batch, in arrival order.
//!
//! One executor thread per device is deliberate: on a GPU one stream is fed
//! best by large batches, and on the CPU LibTorch already spreads one
//! forward pass over its intra-op threads (one per core); a second executor
//! would only make two batches compete for the same cores.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tch::nn;
use tch::{Device, Kind, Tensor};
use tokio::sync::oneshot;
use uuid::Uuid;

use super::backbone::{features, Backbone};
use super::checkpoint::{copy_into_vars, read_named};
use super::classifier::{Classifier, NeighbourVote};
use super::description::ModelDescription;
use super::device::device_name;
use super::training::InputSpec;
use super::transfer::NeighbourBank;
use crate::data::loader::normalise;

/// Which model to run, as the executor needs to rebuild it.
#[derive(Debug, Clone)]
pub struct ModelHandle {
    pub id: Uuid,
    pub backbone: Backbone,
    pub input: InputSpec,
    /// Number of classes of a classifier; `None` for an encoder.
    pub num_classes: Option<usize>,
    /// How a kNN classifier votes; `None` for a linear head.
    pub vote: Option<NeighbourVote>,
    pub weights: PathBuf,
}

impl ModelHandle {
    /// The handle of the model `description` describes, whose weights are at `weights`.
    pub fn of(description: &ModelDescription, weights: PathBuf) -> anyhow::Result<Self> {
        let backbone = description.backbone().ok_or_else(|| {
            anyhow::anyhow!(
                "model {} has unknown backbone {}",
                description.id,
                description.backbone
            )
        })?;
        Ok(Self {
            id: description.id,
            backbone,
            num_classes: description.num_classes(),
            vote: description.vote,
            input: description.input.clone(),
            weights,
        })
    }
}

/// What to compute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

/// How the executor batches and how much it holds.
#[derive(Debug, Clone)]
pub struct InferenceSettings {
    /// Loaded models kept in memory.
    pub cache_size: usize,
    /// Most images merged into one forward pass.
    pub max_batch_size: usize,
    /// Longest wait for more requests after the first of a batch was queued.
    pub max_batch_delay: Duration,
    /// Requests waiting for the executor before new ones are refused.
    pub queue_depth: usize,
}

struct Request {
    model: ModelHandle,
    task: InferenceTask,
    /// Each image `C×S×S` uint8, already at the model's input size.
    images: Vec<Vec<u8>>,
    reply: oneshot::Sender<anyhow::Result<InferenceOutput>>,
    enqueued: Instant,
}

enum Message {
    Run(Request),
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

/// Counts shared by the async side and the executor thread.
#[derive(Default)]
struct Load {
    /// Requests accepted but not yet in a running batch.
    waiting: AtomicUsize,
    /// Requests announced but still being read or decoded.
    arriving: AtomicUsize,
}

/// The async side's handle to the executor thread.
#[derive(Clone)]
pub struct InferenceExecutor {
    queue: std_mpsc::Sender<Message>,
    load: Arc<Load>,
    queue_depth: usize,
    device: Device,
}

/// A request on its way to the executor (its images are being decoded); the
/// executor waits for announced requests to merge them into its batch.
/// Dropping it (or handing it to [`InferenceExecutor::run`]) withdraws it.
pub struct Arrival {
    load: Arc<Load>,
}

impl Drop for Arrival {
    fn drop(&mut self) {
        self.load.arriving.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A model's network: an encoder's trunk, a trunk with a linear head, or a
/// trunk with the labelled features it votes with.
enum Network {
    Encoder(nn::FuncT<'static>),
    Classifier(Classifier),
    Neighbours {
        trunk: nn::FuncT<'static>,
        bank: NeighbourBank,
    },
}

/// A model's network, built and loaded on one device.
pub struct LoadedModel {
    id: Uuid,
    _vs: nn::VarStore,
    network: Network,
}

impl LoadedModel {
    /// Builds the model's network on `device` and loads its weights.
    pub fn load(handle: &ModelHandle, device: Device) -> anyhow::Result<Self> {
        load_model(handle, device)
    }

    /// Pooled features of uint8 images `[N, C, S, S]` already at `input`'s
    /// size, and their class probabilities when `classify` (a classifier's).
    pub fn forward(
        &self,
        batch: &Tensor,
        input: &InputSpec,
        classify: bool,
        device: Device,
    ) -> (Tensor, Option<Tensor>) {
        let xs = normalise(batch, &input.mean, &input.std, device);
        tch::no_grad(|| match &self.network {
            Network::Encoder(trunk) => (features(trunk, &xs, false), None),
            Network::Neighbours { trunk, bank } => {
                let feats = features(trunk, &xs, false);
                let probabilities = classify.then(|| bank.probabilities(&feats));
                (feats, probabilities)
            }
            Network::Classifier(classifier) => {
                let feats = classifier.features(&xs, false);
                let probabilities = classify.then(|| classifier.probabilities_of_features(&feats));
                (feats, probabilities)
            }
        })
    }
}

fn load_model(handle: &ModelHandle, device: Device) -> anyhow::Result<LoadedModel> {
    let vs = nn::VarStore::new(device);
    let channels = handle.input.channels;
    let stored = read_named(&handle.weights)
        .with_context(|| format!("Failed to load model {}", handle.id))?;
    let network = match (handle.num_classes, handle.vote) {
        (Some(k), None) => {
            Network::Classifier(Classifier::new(&vs.root(), handle.backbone, channels, k))
        }
        (Some(k), Some(vote)) => Network::Neighbours {
            trunk: handle.backbone.build(&vs.root(), channels as i64),
            bank: NeighbourBank::from_tensors(&stored, k as i64, vote)?,
        },
        (None, _) => Network::Encoder(handle.backbone.build(&vs.root(), channels as i64)),
    };
    copy_into_vars(&vs, &stored, &handle.weights, |_| true)
        .with_context(|| format!("Failed to load model {}", handle.id))?;
    Ok(LoadedModel {
        id: handle.id,
        _vs: vs,
        network,
    })
}

/// Loaded models, most recently used last.
struct ModelCache {
    models: Vec<LoadedModel>,
    capacity: usize,
}

impl ModelCache {
    /// The model of `handle`, loaded if needed, marked most recently used.
    fn get(&mut self, handle: &ModelHandle, device: Device) -> anyhow::Result<&LoadedModel> {
        let model = match self.models.iter().position(|m| m.id == handle.id) {
            Some(p) => self.models.remove(p),
            None => {
                let loaded = load_model(handle, device)?;
                if self.models.len() >= self.capacity.max(1) {
                    self.models.remove(0);
                }
                loaded
            }
        };
        self.models.push(model);
        Ok(self.models.last().expect("just pushed"))
    }

    fn evict(&mut self, id: Uuid) {
        self.models.retain(|m| m.id != id);
    }
}

/// Features of every image of the batch, and class probabilities when a
/// request asks for them, as rows on the CPU.
struct BatchRows {
    features: Vec<Vec<f32>>,
    probabilities: Option<Vec<Vec<f32>>>,
}

fn forward(
    model: &LoadedModel,
    input: &InputSpec,
    images: &[&[u8]],
    classify: bool,
    device: Device,
) -> anyhow::Result<BatchRows> {
    let size = input.image_size as i64;
    let channels = input.channels as i64;
    let image_bytes = (channels * size * size) as usize;
    let mut flat = Vec::with_capacity(images.len() * image_bytes);
    for image in images {
        anyhow::ensure!(
            image.len() == image_bytes,
            "an image has {} bytes, not {image_bytes}",
            image.len()
        );
        flat.extend_from_slice(image);
    }
    let batch = Tensor::from_slice(&flat).view([images.len() as i64, channels, size, size]);
    let (feats, probabilities) = model.forward(&batch, input, classify, device);
    let probabilities = probabilities.as_ref().map(rows).transpose()?;
    Ok(BatchRows {
        features: rows(&feats)?,
        probabilities,
    })
}

fn rows(tensor: &Tensor) -> anyhow::Result<Vec<Vec<f32>>> {
    let cpu = tensor.to_kind(Kind::Float).to_device(Device::Cpu);
    Ok(Vec::<Vec<f32>>::try_from(cpu)?)
}

/// Gathers the batch that starts with `first`: waiting requests for the same
/// model, up to `max_batch_size` images. Requests for other models (or that
/// would overflow the batch) go to `held`, ahead of anything newer.
fn collect_batch(
    first: Request,
    rx: &std_mpsc::Receiver<Message>,
    held: &mut VecDeque<Request>,
    cache: &mut ModelCache,
    settings: &InferenceSettings,
    load: &Load,
) -> Vec<Request> {
    let id = first.model.id;
    let deadline = first.enqueued + settings.max_batch_delay;
    let mut images = first.images.len();
    let mut batch = vec![first];
    let fits = |images: usize, request: &Request| {
        request.model.id == id && images + request.images.len() <= settings.max_batch_size
    };
    let mut i = 0;
    while i < held.len() && images < settings.max_batch_size {
        if fits(images, &held[i]) {
            let request = held.remove(i).expect("index in range");
            images += request.images.len();
            batch.push(request);
        } else {
            i += 1;
        }
    }
    while images < settings.max_batch_size {
        let message = match rx.try_recv() {
            Ok(message) => message,
            Err(std_mpsc::TryRecvError::Disconnected) => break,
            Err(std_mpsc::TryRecvError::Empty) => {
                let now = Instant::now();
                if load.arriving.load(Ordering::SeqCst) == 0 || now >= deadline {
                    break;
                }
                match rx.recv_timeout(deadline - now) {
                    Ok(message) => message,
                    Err(_) => break,
                }
            }
        };
        match message {
            Message::Evict(evicted) => cache.evict(evicted),
            Message::Run(request) if fits(images, &request) => {
                images += request.images.len();
                batch.push(request);
            }
            Message::Run(request) => {
                let full = request.model.id == id;
                held.push_back(request);
                if full {
                    break;
                }
            }
        }
    }
    batch
}

/// Runs one merged batch and answers each request with its own rows.
fn run_batch(batch: Vec<Request>, cache: &mut ModelCache, device: Device, load: &Load) {
    load.waiting.fetch_sub(batch.len(), Ordering::SeqCst);
    let images: Vec<&[u8]> = batch
        .iter()
        .flat_map(|r| r.images.iter().map(Vec::as_slice))
        .collect();
    for request in &batch {
        crate::telemetry::observe_inference_queued(request.enqueued.elapsed());
    }
    crate::telemetry::observe_inference_batch(images.len());
    let classify = batch.iter().any(|r| r.task == InferenceTask::Classify);
    let handle = &batch[0].model;
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let model = cache.get(handle, device)?;
        let started = Instant::now();
        let rows = forward(model, &handle.input, &images, classify, device);
        crate::telemetry::observe_inference_compute(started.elapsed());
        rows
    }))
    .unwrap_or_else(|_| Err(anyhow::anyhow!("inference panicked")));
    let rows = match result {
        Ok(rows) => rows,
        Err(e) => {
            let message = format!("{e:#}");
            for request in batch {
                let _ = request.reply.send(Err(anyhow::anyhow!("{message}")));
            }
            return;
        }
    };
    let BatchRows {
        features,
        probabilities,
    } = rows;
    let mut features = features.into_iter();
    let mut probabilities = probabilities.map(Vec::into_iter);
    for request in batch {
        let n = request.images.len();
        let own_features: Vec<Vec<f32>> = features.by_ref().take(n).collect();
        let own_probabilities = probabilities
            .as_mut()
            .map(|p| p.by_ref().take(n).collect::<Vec<_>>());
        let answer = match request.task {
            InferenceTask::Embed => Ok(InferenceOutput::Embeddings(own_features)),
            InferenceTask::Classify => own_probabilities
                .map(InferenceOutput::Probabilities)
                .context("the model has no classification head"),
        };
        let _ = request.reply.send(answer);
    }
}

fn executor_loop(
    rx: std_mpsc::Receiver<Message>,
    device: Device,
    settings: InferenceSettings,
    load: Arc<Load>,
) {
    let mut cache = ModelCache {
        models: Vec::new(),
        capacity: settings.cache_size,
    };
    let mut held: VecDeque<Request> = VecDeque::new();
    loop {
        let first = match held.pop_front() {
            Some(request) => request,
            None => match rx.recv() {
                Ok(Message::Run(request)) => request,
                Ok(Message::Evict(id)) => {
                    cache.evict(id);
                    continue;
                }
                Err(_) => break,
            },
        };
        let batch = collect_batch(first, &rx, &mut held, &mut cache, &settings, &load);
        run_batch(batch, &mut cache, device, &load);
    }
}

impl InferenceExecutor {
    /// Starts the executor thread on `device`.
    pub fn start(device: Device, settings: InferenceSettings) -> anyhow::Result<Self> {
        let (tx, rx) = std_mpsc::channel();
        let load = Arc::new(Load::default());
        let queue_depth = settings.queue_depth.max(1);
        let settings = InferenceSettings {
            max_batch_size: settings.max_batch_size.max(1),
            ..settings
        };
        let executor_load = load.clone();
        std::thread::Builder::new()
            .name(format!("pretext-infer-{}", device_name(device)))
            .spawn(move || executor_loop(rx, device, settings, executor_load))
            .context("Failed to start the inference thread")?;
        Ok(Self {
            queue: tx,
            load,
            queue_depth,
            device,
        })
    }

    /// The device models run on.
    pub fn device(&self) -> Device {
        self.device
    }

    /// Admits a request before its body is read and its images decoded, so
    /// that the executor may wait for it to fill a batch: refused with
    /// [`InferenceError::Busy`] when requests waiting for the executor and
    /// requests being decoded already fill the queue, so a flood of requests
    /// costs neither their bodies' memory nor their decodes.
    pub fn announce(&self) -> Result<Arrival, InferenceError> {
        let arriving = self.load.arriving.fetch_add(1, Ordering::SeqCst);
        let arrival = Arrival {
            load: self.load.clone(),
        };
        if arriving + self.load.waiting.load(Ordering::SeqCst) >= self.queue_depth {
            return Err(InferenceError::Busy);
        }
        Ok(arrival)
    }

    /// Runs `task` on preprocessed images, merged with other requests for
    /// the same model; `arrival` is this request's announcement.
    pub async fn run(
        &self,
        model: ModelHandle,
        task: InferenceTask,
        images: Vec<Vec<u8>>,
        arrival: Arrival,
    ) -> Result<InferenceOutput, InferenceError> {
        let (reply, answer) = oneshot::channel();
        let admitted = self
            .load
            .waiting
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |waiting| {
                (waiting < self.queue_depth).then_some(waiting + 1)
            })
            .is_ok();
        if !admitted {
            return Err(InferenceError::Busy);
        }
        let sent = self.queue.send(Message::Run(Request {
            model,
            task,
            images,
            reply,
            enqueued: Instant::now(),
        }));
        drop(arrival);
        if sent.is_err() {
            self.load.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(InferenceError::Stopped);
        }
        Ok(answer.await.map_err(|_| InferenceError::Stopped)??)
    }

    /// Drops a model from the cache (after it was deleted).
    pub fn evict(&self, id: Uuid) {
        let _ = self.queue.send(Message::Evict(id));
    }
}
