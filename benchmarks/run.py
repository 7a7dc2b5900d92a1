"""jaxtl against PyTorch on this machine's CPU, side by side in one run, as ratios.

  python -m benchmarks.run                              # BERT-base, ViT-B/16, ResNet-50; all modes
  python -m benchmarks.run --quick                      # full fine-tune step only, 1 timed step
  python -m benchmarks.run --models resnet --modes full,eval --out /tmp/r.json

Models, random weights, batch 8: BERT-base at 128 tokens (transformers'
BertForSequenceClassification), ViT-B/16 at 224 (ViTForImageClassification), ResNet-50 at 224
(torchvision's layout, tests/torch_cnns.py); on request (--models mobilenet) MobileNetV2 at 224,
torchvision's layout. Modes:
  full         every param trains                       jaxtl preset 'full'
  last_blocks  the last 2 blocks (+ neck) and the head  jaxtl preset 'last_n_blocks:2'
  frozen       the head only (frozen backbone)          jaxtl preset 'linear_probe'
  eval         the inference forward pass
jaxtl's BERT runs its layers as one nn.scan (a much faster compile: the issue's 10 s target is for
that form), and its full step a second time unrolled, as models.create builds it; ViT-B/16
unrolled as models.create builds it (on XLA:CPU faster and leaner than scanned; see scanned());
in last_blocks mode both are unrolled, since a scanned stack could not be split. --layers scan /
unrolled measures both models one way.
The jaxtl step is the product's: jaxtl.train.train_step with freeze.label_params and
make_optimizer (AdamW, weight decay off 1-D params, clipping at global norm 1.0). The PyTorch
step does the same: AdamW (decay off 1-D params) over the trainable params only
(requires_grad=False elsewhere), clip_grad_norm_, frozen modules in eval mode (BatchNorm on
running statistics, no dropout), as jaxtl does. Both use every core (torch.set_num_threads).

Method. Every (framework, model, mode) runs in its own fresh subprocess, so each one's peak
memory is its own: peak RSS (VmHWM) minus the RSS after importing the framework, the same method
for both (jaxtl also reports XLA's memory plan of the compiled step; its worker hands the heap
the compiler freed back to the OS after compiling, as train.py does). The jaxtl and the PyTorch
worker of a (model, mode) are started one after the other (never compiling or loading
concurrently), warm up, and then take turns, one step each, so slow drifts in machine load hit
both alike. Times are the median of the timed steps. Compile time is jaxtl's trace + lower +
compile of the step. FLOP utilisation is the FLOPs the step needs (XLA cost analysis of jaxtl's
compiled step, or for a scanned model of the unrolled step as lowered, since the analysis counts
a loop body once) per second over a float32 matmul peak measured by jax in this run, at its start
and end; the same count for both sides, although PyTorch's ViT does more arithmetic (its last
block computes every token, where jaxtl's computes the class token the head reads: 853 against
794 GFLOP for the full step). The CPU time that other processes used during each measurement
is /proc/stat's busy time minus this process tree's own, so a disturbed run shows. In frozen
mode the jaxtl worker then also times its own eval forward (same params; the first call, which
compiles it, is dropped), alternating with more frozen steps (at least OWN_EVAL_TURNS of each):
the frozen-step target is a ratio to that forward, and two workers started minutes apart drifted
by more than the 5 % it allows.
"""
import argparse
import datetime
from importlib import metadata
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODES = ('full', 'last_blocks', 'frozen', 'eval')
SCHEMES = {'full': 'full', 'last_blocks': 'last_n_blocks:2', 'frozen': 'linear_probe'}
MODELS = ('bert', 'vit', 'resnet')
EXTRA_MODELS = ('mobilenet',)  # Measured when named in --models.
JAXTL_NAMES = {'bert': 'bert-base', 'vit': 'vit-b16', 'resnet': 'resnet50',
               'mobilenet': 'mobilenet_v2'}
NUM_CLASSES = {'bert': 2, 'vit': 1000, 'resnet': 1000, 'mobilenet': 1000}
BATCH, SEQ, IMAGE = 8, 128, 224
# Turns of the frozen step against its own eval forward: at least this many, since the target
# (1.05) sits inside five turns' noise on a 2-core host (ResNet-50: 1.04 and 1.06 in two runs of
# 5 turns, 1.016 over 30).
OWN_EVAL_TURNS = 10


# ---------------------------------------------------------------------------------------------
# Process accounting (Linux /proc).
# ---------------------------------------------------------------------------------------------
TICK = os.sysconf('SC_CLK_TCK')


def rss_mb(field='VmRSS'):
  """This process's resident set (VmRSS) or its peak so far (VmHWM), in MiB."""
  for line in pathlib.Path('/proc/self/status').read_text().splitlines():
    if line.startswith(field + ':'):
      return int(line.split()[1]) / 1024
  return float('nan')


def machine_busy_s():
  """CPU seconds all processes have spent busy since boot, summed over cores (/proc/stat)."""
  fields = [int(v) for v in pathlib.Path('/proc/stat').read_text().split('\n')[0].split()[1:]]
  user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
  return (user + nice + system + irq + softirq + steal) / TICK


def process_cpu_s(pid):
  """CPU seconds of a live process and its waited-for children (utime+stime+cutime+cstime)."""
  try:
    stat = pathlib.Path(f'/proc/{pid}/stat').read_text()
  except FileNotFoundError:
    return 0.0
  fields = stat.rsplit(')', 1)[1].split()
  return sum(int(v) for v in fields[11:15]) / TICK


def own_cpu_s(worker_pids):
  """CPU seconds of this process, its finished children and its live workers."""
  t = os.times()
  return (t.user + t.system + t.children_user + t.children_system
          + sum(process_cpu_s(pid) for pid in worker_pids))


class OthersMeter:
  """CPU time that processes outside this run used between start() and stop()."""

  def start(self, pids=()):
    self.t0, self.busy0, self.own0 = time.perf_counter(), machine_busy_s(), own_cpu_s(pids)
    return self

  def stop(self, pids=()):
    wall = time.perf_counter() - self.t0
    others = max(0.0, (machine_busy_s() - self.busy0) - (own_cpu_s(pids) - self.own0))
    return dict(wall_s=wall, others_cpu_s=others,
                others_share=others / max(wall * os.cpu_count(), 1e-9))


# ---------------------------------------------------------------------------------------------
# Workers: one fresh process per (framework, model, mode). They speak JSON lines on stdout.
# ---------------------------------------------------------------------------------------------
def scanned(model, mode, layers):
  """Whether jaxtl's model runs its layers as one nn.scan: never in last_blocks mode (a scanned
  stack of layers freezes or trains as a whole); otherwise BERT and ViT with --layers scan, and
  with --layers auto BERT alone. ViT-B/16 then runs as models.create builds it, unrolled: on
  XLA:CPU its full step is ~6 % faster and plans ~430 MiB fewer temporaries, for a compile of
  ~7 s instead of ~4 s. (BERT-base unrolled is ~5 % faster too, but compiles in ~13 s.)"""
  if mode == 'last_blocks' or model not in ('bert', 'vit'):
    return False
  return layers == 'scan' or (layers == 'auto' and model == 'bert')


def layer_forms(model, mode, layers):
  """The --layers values to measure (model, mode) with: with auto, BERT-base's full step twice,
  scanned (the form of the compile target) and unrolled (models.create's default and the
  configs': faster steps, a ~13 s compile)."""
  if layers == 'auto' and model == 'bert' and mode == 'full':
    return ('auto', 'unrolled')
  return (layers,)


def unrolled_flops(module, mode, batch):
  """XLA's cost analysis counts a scan's body once, not once per layer: the FLOPs of a scanned
  model's step are those of the same step with the layers unrolled, lowered (not compiled) from
  shapes alone."""
  import jax

  from benchmarks import accelerator as common

  unrolled = module.clone(scan=False)
  variables = jax.eval_shape(lambda: unrolled.init(jax.random.key(0), *unrolled.example_inputs()))
  if mode == 'eval':
    return common.cost(jax.jit(common.forward_fn(unrolled)).lower(variables, batch))
  built = {}

  def setup(variables):
    state, built['step'] = common.train_setup(unrolled, variables, SCHEMES[mode])
    return state
  state = jax.eval_shape(setup, variables)
  return common.cost(jax.jit(built['step']).lower(state, batch))


def jaxtl_worker(model, mode, warmup, layers):
  import jax

  from benchmarks import accelerator as common
  from jaxtl import models, train as train_lib

  base_rss = rss_mb()
  scan = scanned(model, mode, layers)
  module = models.create(JAXTL_NAMES[model], num_classes=NUM_CLASSES[model],
                         **({'scan': True} if scan else {}))
  batch = (common.text_batch(BATCH, SEQ) if model == 'bert' else common.image_batch(BATCH, IMAGE))
  batch = jax.device_put(batch)
  variables = common.init_variables(module)
  if mode == 'eval':
    compiled, compile_s = compiled_forward(module, variables, batch)
    run = lambda: compiled(variables, batch)
  else:
    state, step = common.train_setup(module, variables, SCHEMES[mode])
    del variables  # The state holds the params; no second copy.
    compiled, compile_s = common.compile_timed(step, state, batch, donate=(0,))
    train_lib.release_freed_host_memory()  # As train.py does once the step has compiled.
    holder = [state]
    del state

    def run():
      holder[0], metrics = compiled(holder[0], batch)
      return metrics['loss']
  timed = lambda: jax.block_until_ready(run())
  flops = unrolled_flops(module, mode, batch) if scan else common.cost(compiled)
  commands = {'step': timed}
  if mode == 'frozen':
    commands['eval'] = own_eval(module, lambda: holder[0], batch)
  return commands, dict(base_rss_mb=base_rss, compile_s=compile_s, flops=flops,
                        xla_memory=common.memory(compiled), scan=scan,
                        glibc_tunables=os.environ.get('GLIBC_TUNABLES'))


def compiled_forward(module, variables, batch):
  """(jaxtl's inference forward compiled for these variables and batch, compile seconds), with
  the heap the compiler freed handed back, as train.py's evaluation does once compiled."""
  from benchmarks import accelerator as common
  from jaxtl import train as train_lib

  compiled, compile_s = common.compile_timed(common.forward_fn(module), variables, batch)
  train_lib.release_freed_host_memory()
  return compiled, compile_s


def own_eval(module, current_state, batch):
  """The frozen worker's 'eval' command: one inference forward of the model with the training
  state's current params, built as the eval worker builds its own; the first call compiles it
  and is its warm-up (measure() drops its time). The issue's frozen-step target is against this
  forward, so the two are timed in one process, alternating."""
  import jax
  compiled = []

  def timed():
    state = current_state()
    variables = {'params': state.params, **state.model_state}
    if not compiled:
      compiled.append(compiled_forward(module, variables, batch)[0])
    return jax.block_until_ready(compiled[0](variables, batch))
  return timed


def torch_model(model):
  """(net, forward(net, batch) -> logits, torch batch, modules trained by last_blocks, head)."""
  import torch
  import transformers

  torch.manual_seed(0)
  if model == 'bert':
    net = transformers.BertForSequenceClassification(transformers.BertConfig(
        num_labels=NUM_CLASSES[model]))
    forward = lambda net, b: net(input_ids=b['input_ids'],
                                 attention_mask=b['attention_mask']).logits
    layers = net.bert.encoder.layer
    # jaxtl's BERT head is the classifier (with the dropout before it); the pooler is its neck.
    head = [net.classifier, net.dropout]
    last = [layers[-2], layers[-1], net.bert.pooler] + head
  elif model == 'vit':
    net = transformers.ViTForImageClassification(transformers.ViTConfig(
        num_labels=NUM_CLASSES[model]))
    forward = lambda net, b: net(pixel_values=b['images']).logits
    # transformers 5 holds the blocks in vit.layers; 4.x in vit.encoder.layer.
    layers = net.vit.layers if hasattr(net.vit, 'layers') else net.vit.encoder.layer
    head = [net.classifier]
    last = [layers[-2], layers[-1], net.vit.layernorm] + head
  elif model == 'resnet':
    sys.path.insert(0, str(ROOT / 'tests'))
    import torch_cnns
    net = torch_cnns.resnet(50, num_classes=NUM_CLASSES[model])
    forward = lambda net, b: net(b['images'])[0]
    head = [net.fc]
    last = [net.layer4[-2], net.layer4[-1]] + head
  else:
    sys.path.insert(0, str(ROOT / 'tests'))
    import torch_cnns
    net = torch_cnns.MobileNetV2(num_classes=NUM_CLASSES[model])
    forward = lambda net, b: net(b['images'])[0]
    head = [net.classifier]
    # jaxtl's last_n_blocks:2 = the last two inverted residuals, the neck (features.18), the head.
    last = [net.features[-3], net.features[-2], net.features[-1]] + head
  return net, forward, last, head


def torch_worker(model, mode, warmup, layers=None):
  import torch

  from benchmarks import accelerator as common

  torch.set_num_threads(len(os.sched_getaffinity(0)))  # Every core this process may use.
  base_rss = rss_mb()
  net, forward, last, head = torch_model(model)
  if model == 'bert':
    batch = {k: torch.from_numpy(v).long() for k, v in common.text_batch(BATCH, SEQ).items()}
  else:
    batch = {k: torch.from_numpy(v) for k, v in common.image_batch(BATCH, IMAGE).items()}
    batch['images'] = batch['images'].permute(0, 3, 1, 2).contiguous()  # NCHW, torch's layout.
    batch['label'] = batch['label'].long()

  if mode == 'eval':
    net.eval()

    def run():
      with torch.inference_mode():
        return forward(net, batch)
  else:
    trained = {'full': [net], 'last_blocks': last, 'frozen': head}[mode]
    net.requires_grad_(False)
    net.eval()  # Frozen parts run in inference mode, as in jaxtl.
    for module in trained:
      module.requires_grad_(True)
      module.train()
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{'params': [p for p in params if p.ndim > 1], 'weight_decay': 0.01},
         {'params': [p for p in params if p.ndim <= 1], 'weight_decay': 0.0}], lr=1e-4)

    def run():
      optimizer.zero_grad(set_to_none=True)
      loss = torch.nn.functional.cross_entropy(forward(net, batch), batch['label'])
      loss.backward()
      torch.nn.utils.clip_grad_norm_(params, 1.0)
      optimizer.step()
      return loss
  return {'step': run}, dict(base_rss_mb=base_rss, torch_threads=torch.get_num_threads())


def worker_main(spec, warmup):
  """`--worker framework:model:mode:layers`: build, warm up, say ready, then time one step per
  'step' line on stdin until 'stop', and report peak memory. jaxtl's frozen worker also takes
  'eval' (its own inference forward, see own_eval); the peak reported is the one before the
  first of those, the step's alone."""
  framework, model, mode, layers = spec.split(':')
  if framework == 'jaxtl':
    from jaxtl import train as train_lib
    train_lib.exec_with_host_malloc()  # As train.py does; before the next line's descriptor.
  protocol = os.fdopen(os.dup(1), 'w')
  os.dup2(2, 1)  # Anything else that prints (libraries, XLA) goes to stderr, not the protocol.
  say = lambda obj: (protocol.write(json.dumps(obj) + '\n'), protocol.flush())
  info_cpus = sorted(os.sched_getaffinity(0))
  commands, info = (jaxtl_worker if framework == 'jaxtl' else torch_worker)(model, mode, warmup,
                                                                           layers)
  for _ in range(warmup):
    commands['step']()
  say(dict(ready=True, cpus=info_cpus, commands=sorted(commands), **info))
  peak = None
  for line in sys.stdin:
    command = line.strip()
    if command not in commands:
      break
    if command != 'step' and peak is None:
      peak = rss_mb('VmHWM')  # Before anything but the step compiles or runs.
    start, cpu = time.perf_counter(), time.process_time()
    commands[command]()
    say(dict(step_s=time.perf_counter() - start, cpu_s=time.process_time() - cpu))
  peak = rss_mb('VmHWM') if peak is None else peak
  say(dict(peak_rss_mb=peak, peak_delta_mb=peak - info['base_rss_mb']))


def peak_worker():
  """float32 matmul GFLOP/s, jax's (the utilisation reference) and torch's, best of 3."""
  import jax
  import jax.numpy as jnp
  import torch

  torch.set_num_threads(len(os.sched_getaffinity(0)))
  n = 2048
  result = {}
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  f = jax.jit(jnp.dot)
  ta = torch.randn(n, n)
  for name, call in (('jax', lambda: jax.block_until_ready(f(a, a))), ('torch', lambda: ta @ ta)):
    call()
    best = float('inf')
    for _ in range(3):
      start = time.perf_counter()
      call()
      best = min(best, time.perf_counter() - start)
    result[name] = 2 * n ** 3 / best / 1e9
  print(json.dumps(result))


# ---------------------------------------------------------------------------------------------
# The parent: starts workers one at a time, alternates their steps, prints and writes ratios.
# ---------------------------------------------------------------------------------------------
class Worker:
  def __init__(self, spec, warmup, cpus=None):
    self.spec = spec
    self.log = tempfile.TemporaryFile('w+')
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in [os.environ.get('PYTHONPATH')] if p]))
    self.proc = subprocess.Popen(
        [sys.executable, '-m', 'benchmarks.run', '--worker', spec, '--warmup', str(warmup)],
        cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
        text=True, preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
    self.info = self._read()

  def _read(self):
    line = self.proc.stdout.readline()
    if not line:
      self.proc.wait()
      self.log.seek(0)
      tail = self.log.read()[-3000:]
      raise RuntimeError(f'worker {self.spec} died (exit {self.proc.returncode}):\n{tail}')
    return json.loads(line)

  def step(self, command='step'):
    """(wall seconds, CPU seconds of the worker) of one step (or of another command)."""
    self.proc.stdin.write(command + '\n')
    self.proc.stdin.flush()
    reply = self._read()
    return reply['step_s'], reply['cpu_s']

  def stop(self):
    self.proc.stdin.write('stop\n')
    self.proc.stdin.flush()
    final = self._read()
    self.proc.wait()
    return final


def measure_peak(cpus=None):
  out = subprocess.run([sys.executable, '-m', 'benchmarks.run', '--peak'], cwd=ROOT,
                       capture_output=True, text=True, check=True,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)),
                       preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
  return json.loads(out.stdout.strip().splitlines()[-1])


def measure(model, mode, steps, warmup, cpus=None, layers='auto'):
  """One (model, mode): the two workers, started in turn, then alternating steps."""
  started = time.perf_counter()
  jaxtl = Worker(f'jaxtl:{model}:{mode}:{layers}', warmup, cpus)
  torch_ = Worker(f'torch:{model}:{mode}:{layers}', warmup, cpus)
  pids = (jaxtl.proc.pid, torch_.proc.pid)
  meter = OthersMeter().start(pids)
  times = {'jaxtl': [], 'torch': []}
  for _ in range(steps):
    times['jaxtl'].append(jaxtl.step())
    times['torch'].append(torch_.step())
  own_eval = []
  if 'eval' in jaxtl.info['commands']:
    # The frozen-step target is against jaxtl's own eval forward: both in this one worker, in
    # turn (the first eval compiles it; its time is dropped).
    jaxtl.step('eval')
    for _ in range(max(steps, OWN_EVAL_TURNS)):
      own_eval.append((jaxtl.step('eval')[0], jaxtl.step()[0]))
  disturbance = meter.stop(pids)
  finals = {'jaxtl': jaxtl.stop(), 'torch': torch_.stop()}
  row = dict(model=model, mode=mode, scheme=SCHEMES.get(mode), steps=steps, warmup=warmup,
             total_s=time.perf_counter() - started, timed_wall_s=disturbance.pop('wall_s'),
             **disturbance)
  for name, worker in (('jaxtl', jaxtl), ('torch', torch_)):
    wall, cpu = zip(*times[name])
    row[name] = dict(step_s=statistics.median(wall), min_s=min(wall), times_s=wall,
                     cpu_s=statistics.median(cpu), cpu_times_s=cpu, **worker.info, **finals[name])
    row[name].pop('ready')
  row['time_ratio'] = row['jaxtl']['step_s'] / row['torch']['step_s']
  row['cpu_ratio'] = row['jaxtl']['cpu_s'] / row['torch']['cpu_s']
  row['memory_ratio'] = row['jaxtl']['peak_delta_mb'] / row['torch']['peak_delta_mb']
  if own_eval:
    evals, steps_ = zip(*own_eval)
    row['own_eval'] = dict(eval_s=statistics.median(evals), step_s=statistics.median(steps_),
                           eval_times_s=evals, step_times_s=steps_)
    row['own_eval']['ratio'] = row['own_eval']['step_s'] / row['own_eval']['eval_s']
  return row


def _mode_label(row):
  """The row's mode, marked '(scan)' where jaxtl ran its layers as one nn.scan."""
  return row['mode'] + (' (scan)' if row['jaxtl'].get('scan') else '')


def _table(rows, peak_gflops):
  header = (f'{"model":10s} {"mode":14s} {"jaxtl s":>8s} {"torch s":>8s} {"ratio":>6s} '
            f'{"cpu":>5s}   '
            f'{"compile s":>9s}   {"mem MiB jaxtl/torch":>19s} {"ratio":>6s}   '
            f'{"FLOP util jaxtl/torch":>21s}   {"others":>6s}')
  lines = [header, '-' * len(header)]
  for r in rows:
    j, t = r['jaxtl'], r['torch']
    util = lambda s: 100 * j['flops'] / s / (peak_gflops * 1e9)
    lines.append(
        f'{r["model"]:10s} {_mode_label(r):14s} {j["step_s"]:8.3f} {t["step_s"]:8.3f} '
        f'{r["time_ratio"]:6.2f} {r["cpu_ratio"]:5.2f}   {j["compile_s"]:9.1f}   '
        f'{j["peak_delta_mb"]:9,.0f}/{t["peak_delta_mb"]:<9,.0f} {r["memory_ratio"]:6.2f}   '
        f'{util(j["step_s"]):9.0f}% /{util(t["step_s"]):4.0f}%      '
        f'{100 * r["others_share"]:5.0f}%')
  return '\n'.join(lines)


def default_out(quick, directory=None, today=None):
  """benchmarks/results/<date>.json (<date>-quick.json for --quick); a later run the same day
  gets -2, -3, ...: an earlier result is never overwritten."""
  directory = pathlib.Path(directory or ROOT / 'benchmarks' / 'results')
  stem = (today or datetime.date.today()).isoformat() + ('-quick' if quick else '')
  out, n = directory / f'{stem}.json', 1
  while out.exists():
    n += 1
    out = directory / f'{stem}-{n}.json'
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--quick', action='store_true',
                      help='the full fine-tune step only, 1 warm-up and 1 timed step per side '
                           '(about 3 minutes on a quiet 2-core CPU)')
  parser.add_argument('--models', default=','.join(MODELS),
                      help='comma-separated: bert,vit,resnet (default), mobilenet')
  parser.add_argument('--modes', default=None, help=f'comma-separated: {",".join(MODES)}')
  parser.add_argument('--steps', type=int, default=None, help='timed steps per side (default 5)')
  parser.add_argument('--warmup', type=int, default=1, help='untimed steps after compiling')
  parser.add_argument('--out', default=None, help='JSON path (default benchmarks/results/'
                      '<date>[-quick].json, numbered -2, -3, ... when taken)')
  parser.add_argument('--cpus', default=None,
                      help='pin both frameworks to these CPUs, e.g. "0" for a one-core comparison '
                           '(default: all cores)')
  parser.add_argument('--layers', choices=('auto', 'scan', 'unrolled'), default='auto',
                      help="jaxtl's BERT and ViT: layers as one nn.scan or unrolled (never scanned "
                           'in last_blocks mode, where a scanned stack cannot be split); auto '
                           "(default): BERT scanned (its full step unrolled as well), ViT "
                           'unrolled')
  parser.add_argument('--worker', help=argparse.SUPPRESS)
  parser.add_argument('--peak', action='store_true', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    return worker_main(args.worker, args.warmup)
  if args.peak:
    return peak_worker()

  models = args.models.split(',')
  cpus = {int(c) for c in args.cpus.split(',')} if args.cpus else None
  modes = args.modes.split(',') if args.modes else (['full'] if args.quick else list(MODES))
  steps = args.steps or (1 if args.quick else 5)
  for name, valid in ((models, MODELS + EXTRA_MODELS), (modes, MODES)):
    bad = sorted(set(name) - set(valid))
    if bad:
      parser.error(f'unknown {bad}; choose from {",".join(valid)}')
  if args.quick and not args.modes:
    print(f'--quick: the full fine-tune step only, {steps} timed step(s) per side after '
          f'{args.warmup} warm-up, one matmul-peak measurement; skips the last_blocks, frozen and '
          f'eval modes and the repeated steps. Drop --quick for all of them.')
  pinned = f' (workers pinned to CPUs {sorted(cpus)})' if cpus else ''
  print(f'{os.cpu_count()} CPUs{pinned}; models {models}; modes {modes}; {steps} timed steps '
        'each, jaxtl and PyTorch alternating', flush=True)

  run_meter = OthersMeter().start()
  peaks = [measure_peak(cpus)]
  print(f'matmul peak (2048^3 float32): jax {peaks[0]["jax"]:.0f} GFLOP/s, '
        f'torch {peaks[0]["torch"]:.0f} GFLOP/s', flush=True)
  rows = []
  for model in models:
    for mode, layers in [(m, f) for m in modes for f in layer_forms(model, m, args.layers)]:
      row = measure(model, mode, steps, args.warmup, cpus, layers)
      rows.append(row)
      print(f'  {model:6s} {_mode_label(row):18s} jaxtl {row["jaxtl"]["step_s"]:7.3f} s  torch '
            f'{row["torch"]["step_s"]:7.3f} s  ratio {row["time_ratio"]:5.2f}  (others used '
            f'{100 * row["others_share"]:.0f}% of the CPUs; {row["total_s"]:.0f} s)', flush=True)
  if not args.quick:  # A second measurement at the end shows drift; quick saves the time.
    peaks.append(measure_peak(cpus))
  disturbance = run_meter.stop()
  peak = max(p['jax'] for p in peaks)

  print(f'\nTimes: median step (s). Ratios: jaxtl / PyTorch (below 1: jaxtl is faster or '
        f'smaller); cpu: the same for CPU seconds per step (spin-waiting included). Memory: peak '
        f'RSS minus RSS after import. FLOP util: XLA\'s FLOPs of the step per second over the '
        f'best jax matmul ({peak:.0f} GFLOP/s). others: CPU share used by other processes while '
        f'timing.')
  print(_table(rows, peak))
  own = [r for r in rows if 'own_eval' in r]
  if own:
    print("\nFrozen-backbone step against jaxtl's own eval forward (one worker, in turn; the "
          'target is 1.05): ' + ', '.join(
              f'{r["model"]} {r["own_eval"]["ratio"]:.2f} ({r["own_eval"]["step_s"]:.3f} / '
              f'{r["own_eval"]["eval_s"]:.3f} s)' for r in own))
  disturbed = '; timings are disturbed' if disturbance['others_share'] > 0.05 else ''
  print(f'\nOther processes used {disturbance["others_cpu_s"]:.0f} CPU-seconds during the '
        f'{disturbance["wall_s"]:.0f} s run ({100 * disturbance["others_share"]:.0f}% of '
        f'{os.cpu_count()} CPUs){disturbed}.')

  result = dict(
      date=datetime.datetime.now().isoformat(timespec='seconds'), quick=args.quick,
      machine=dict(cpus=os.cpu_count(), processor=platform.processor() or platform.machine(),
                   python=platform.python_version(), jax=metadata.version('jax'),
                   torch=metadata.version('torch'), transformers=metadata.version('transformers')),
      batch_size=BATCH, seq=SEQ, image_size=IMAGE, steps=steps, warmup=args.warmup,
      worker_cpus=sorted(cpus) if cpus else 'all', layers=args.layers,
      matmul_gflops=peaks, peak_gflops=peak, disturbance=disturbance,
      method=__doc__.split('Method. ')[1].strip(), rows=rows)
  out = pathlib.Path(args.out) if args.out else default_out(args.quick)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=1))
  print(f'wrote {out}')


if __name__ == '__main__':
  main()
