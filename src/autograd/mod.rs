//! A thin autograd tape.
//!
//! A [`Var`] is a value (f32, row-major, shared by `Arc` so saving it for backward copies
//! nothing) plus, when it depends on a trainable parameter, the id of its tape node. Each
//! differentiable op ([`functions`]) computes its forward with a function of [`crate::ops`] and,
//! only when the tape records and an input needs a gradient, pushes a backward closure that
//! captures exactly what that backward needs. [`Tape::backward`] runs the closures in reverse
//! and returns gradients for the trainable parameters only: frozen weights never get a node,
//! so they cost no gradient memory, and a [`Tape::no_grad`] tape records nothing at all.

pub mod functions;

use crate::{Error, Result};
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

/// Index of a node on a tape.
pub type NodeId = usize;

/// A backward closure: output gradient in, one gradient per recorded input out
/// (`None` for inputs that need none).
pub type BackwardFn = Box<dyn FnOnce(&[f32]) -> Result<Vec<Option<Vec<f32>>>>>;

/// A value on (or off) the tape.
#[derive(Clone, Debug)]
pub struct Var {
    data: Arc<Vec<f32>>,
    shape: Vec<usize>,
    node: Option<NodeId>,
}

impl Var {
    /// A value that needs no gradient (inputs, frozen weights, inference activations).
    pub fn constant(data: Vec<f32>, shape: &[usize]) -> Result<Var> {
        Self::from_arc(Arc::new(data), shape)
    }
    /// As [`Var::constant`], sharing existing storage.
    pub fn from_arc(data: Arc<Vec<f32>>, shape: &[usize]) -> Result<Var> {
        let n: usize = shape.iter().product();
        if n != data.len() {
            return Err(Error::shape("Var", format!("shape {shape:?} needs {n} elements, got {}", data.len())));
        }
        Ok(Var { data, shape: shape.to_vec(), node: None })
    }
    pub fn data(&self) -> &[f32] {
        &self.data
    }
    /// The shared storage (cloning it copies nothing).
    pub fn arc(&self) -> &Arc<Vec<f32>> {
        &self.data
    }
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn len(&self) -> usize {
        self.data.len()
    }
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
    /// Whether a gradient flows back through this value.
    pub fn requires_grad(&self) -> bool {
        self.node.is_some()
    }
    pub fn node(&self) -> Option<NodeId> {
        self.node
    }
    /// The value as a scalar (for a loss).
    pub fn item(&self) -> f32 {
        self.data[0]
    }
}

enum Node {
    /// A trainable parameter with the caller's id.
    Leaf(usize),
    /// An op's output: its inputs' nodes and its backward.
    Op { inputs: Vec<Option<NodeId>>, backward: Option<BackwardFn> },
}

/// Records ops; see the module docs.
pub struct Tape {
    nodes: RefCell<Vec<Node>>,
    recording: bool,
}

impl Default for Tape {
    fn default() -> Self {
        Tape::new()
    }
}

/// Gradients of the trainable parameters, keyed by the ids given to [`Tape::param`].
#[derive(Debug, Default)]
pub struct Grads(pub HashMap<usize, Vec<f32>>);

impl Grads {
    pub fn get(&self, id: usize) -> Option<&[f32]> {
        self.0.get(&id).map(|v| v.as_slice())
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Tape {
    /// A tape that records.
    pub fn new() -> Self {
        Tape { nodes: RefCell::new(Vec::new()), recording: true }
    }
    /// A tape that records nothing: ops only compute (inference).
    pub fn no_grad() -> Self {
        Tape { nodes: RefCell::new(Vec::new()), recording: false }
    }
    pub fn is_recording(&self) -> bool {
        self.recording
    }
    /// Number of recorded nodes.
    pub fn len(&self) -> usize {
        self.nodes.borrow().len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// A trainable parameter; its gradient is returned under `id` by [`Tape::backward`].
    /// On a non-recording tape this is a constant.
    pub fn param(&self, id: usize, data: Arc<Vec<f32>>, shape: &[usize]) -> Result<Var> {
        let mut v = Var::from_arc(data, shape)?;
        if self.recording {
            let mut nodes = self.nodes.borrow_mut();
            v.node = Some(nodes.len());
            nodes.push(Node::Leaf(id));
        }
        Ok(v)
    }
    /// Whether an op with these inputs must record a backward.
    pub fn needs_grad(&self, inputs: &[&Var]) -> bool {
        self.recording && inputs.iter().any(|v| v.requires_grad())
    }
    /// Wraps an op's output. When [`Tape::needs_grad`] holds, `make_backward()` is called and
    /// its closure recorded; it must return one gradient per entry of `inputs`, in order.
    pub fn record(
        &self,
        data: Vec<f32>,
        shape: &[usize],
        inputs: &[&Var],
        make_backward: impl FnOnce() -> BackwardFn,
    ) -> Result<Var> {
        let mut v = Var::constant(data, shape)?;
        if self.needs_grad(inputs) {
            let mut nodes = self.nodes.borrow_mut();
            v.node = Some(nodes.len());
            nodes.push(Node::Op { inputs: inputs.iter().map(|x| x.node).collect(), backward: Some(make_backward()) });
        }
        Ok(v)
    }
    /// Runs backward from the scalar `loss` (seed gradient 1). Consumes the recorded closures
    /// (and with them the saved activations); intermediate gradients are freed as soon as
    /// they have been propagated.
    pub fn backward(&self, loss: &Var) -> Result<Grads> {
        if loss.len() != 1 {
            return Err(Error::shape("backward", format!("loss must be a scalar, has shape {:?}", loss.shape)));
        }
        let mut grads = Grads::default();
        let Some(root) = loss.node else { return Ok(grads) };
        let mut nodes = self.nodes.borrow_mut();
        let mut pending: Vec<Option<Vec<f32>>> = (0..nodes.len()).map(|_| None).collect();
        pending[root] = Some(vec![1.0]);
        for id in (0..=root).rev() {
            let Some(g) = pending[id].take() else { continue };
            match &mut nodes[id] {
                Node::Leaf(pid) => accumulate(grads.0.entry(*pid).or_default(), g),
                Node::Op { inputs, backward } => {
                    let f = backward.take().ok_or_else(|| Error::shape("backward", "node already consumed"))?;
                    for (inp, gi) in inputs.iter().zip(f(&g)?) {
                        if let (Some(n), Some(gi)) = (inp, gi) {
                            accumulate(pending[*n].get_or_insert_with(Vec::new), gi);
                        }
                    }
                }
            }
        }
        nodes.clear();
        Ok(grads)
    }
}

/// `acc += g` (moves `g` in when `acc` is still empty).
fn accumulate(acc: &mut Vec<f32>, g: Vec<f32>) {
    if acc.is_empty() {
        *acc = g;
    } else {
        crate::ops::simd::par_add_assign(acc, &g);
    }
}
