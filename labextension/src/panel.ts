/**
 * The lan2gpu sidebar: every worker with its state, every GPU with a sparkline of
 * utilization and memory, and the cells running and waiting (this server's own
 * marked). It polls while it is visible and stops while hidden.
 */
import { Message } from '@lumino/messaging';
import { Signal, ISignal } from '@lumino/signaling';
import { Widget } from '@lumino/widgets';

import { fetchSnapshot, IGpu, IJob, ISnapshot, IWorker } from './api';

const POLL_MS = 2000;

function el(tag: string, cls: string, text = ''): HTMLElement {
  const node = document.createElement(tag);
  node.className = cls;
  if (text) {
    node.textContent = text;
  }
  return node;
}

function size(bytes: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${value.toFixed(unit === 0 ? 0 : 1)} ${units[unit]}`;
}

const SVG = 'http://www.w3.org/2000/svg';

/** Two lines over the GPU's recent history: utilization (when known) and memory. */
export function sparkline(gpu: IGpu, width = 120, height = 24): SVGSVGElement {
  const svg = document.createElementNS(SVG, 'svg');
  svg.setAttribute('class', 'lan2gpu-spark');
  svg.setAttribute('width', String(width));
  svg.setAttribute('height', String(height));
  svg.setAttribute('viewBox', `0 0 ${width} ${height}`);
  const points = gpu.history;
  const series: Array<[string, (row: Array<number | null>) => number | null]> = [
    ['lan2gpu-spark-util', row => (row[1] === null ? null : Number(row[1]) / 100)],
    [
      'lan2gpu-spark-mem',
      row => (row[2] === null || !gpu.memory_total ? null : Number(row[2]) / gpu.memory_total)
    ]
  ];
  for (const [cls, pick] of series) {
    const coords: string[] = [];
    points.forEach((row, i) => {
      const value = pick(row);
      if (value !== null && points.length > 1) {
        const x = (i / (points.length - 1)) * width;
        const y = height - 1 - Math.max(0, Math.min(1, value)) * (height - 2);
        coords.push(`${x.toFixed(1)},${y.toFixed(1)}`);
      }
    });
    if (coords.length > 1) {
      const line = document.createElementNS(SVG, 'polyline');
      line.setAttribute('class', cls);
      line.setAttribute('points', coords.join(' '));
      svg.appendChild(line);
    }
  }
  return svg;
}

export class Lan2GPUPanel extends Widget {
  constructor() {
    super();
    this.id = 'lan2gpu-panel';
    this.addClass('lan2gpu-panel');
    this.title.caption = 'lan2gpu: workers, GPUs and cells';
    this._body = el('div', 'lan2gpu-body', 'Loading…');
    this.node.appendChild(this._body);
  }

  /** A worker or GPU was clicked: open the full dashboard. */
  get opened(): ISignal<this, string> {
    return this._opened;
  }

  /** Every new snapshot, for the status bar. */
  get refreshed(): ISignal<this, ISnapshot> {
    return this._refreshed;
  }

  /** A poll that failed, for the status bar. */
  get failed(): ISignal<this, string> {
    return this._failed;
  }

  async refresh(): Promise<void> {
    if (this._busy || document.hidden) {
      return; // one request at a time; none while the browser tab is in the background
    }
    this._busy = true;
    try {
      const snap = await fetchSnapshot();
      this.render(snap);
      this._refreshed.emit(snap);
    } catch (error) {
      const text = `Cannot read the lan2gpu dashboard API: ${String(error)}`;
      this._body.replaceChildren(el('div', 'lan2gpu-error', text));
      this._failed.emit(String(error));
    } finally {
      this._busy = false;
    }
  }

  protected onAfterShow(msg: Message): void {
    super.onAfterShow(msg);
    this.start();
  }

  protected onAfterAttach(msg: Message): void {
    super.onAfterAttach(msg);
    if (this.isVisible) {
      this.start();
    }
  }

  protected onAfterHide(msg: Message): void {
    super.onAfterHide(msg);
    this.stop();
  }

  protected onBeforeDetach(msg: Message): void {
    this.stop();
    super.onBeforeDetach(msg);
  }

  dispose(): void {
    this.stop();
    super.dispose();
  }

  /** Whether the panel is polling now (it does only while visible). */
  get polling(): boolean {
    return this._timer !== null;
  }

  private start(): void {
    if (this._timer === null) {
      void this.refresh();
      this._timer = window.setInterval(() => void this.refresh(), POLL_MS);
      this.node.dataset.polling = 'true';
    }
  }

  private stop(): void {
    if (this._timer !== null) {
      window.clearInterval(this._timer);
      this._timer = null;
      this.node.dataset.polling = 'false';
    }
  }

  private render(snap: ISnapshot): void {
    const parts: HTMLElement[] = [];
    const header = el('div', 'lan2gpu-header');
    header.appendChild(el('span', 'lan2gpu-title', 'lan2gpu'));
    const open = el('button', 'jp-Button lan2gpu-open', 'Dashboard');
    open.title = 'Open the full lan2gpu dashboard in a tab';
    open.onclick = () => this._opened.emit('');
    header.appendChild(open);
    parts.push(header);
    if (snap.error) {
      parts.push(el('div', 'lan2gpu-error', snap.error));
    }
    parts.push(el('h3', 'lan2gpu-section', `Workers (${snap.workers.length})`));
    if (snap.workers.length === 0) {
      parts.push(
        el(
          'div',
          'lan2gpu-empty',
          'No workers known: set c.Lan2GPU.workers or LAN2GPU_WORKERS, or start ' +
            '`python -m worker_kernel` on a GPU host of this LAN.'
        )
      );
    }
    for (const worker of snap.workers) {
      parts.push(this.workerRow(worker, snap.gpus));
    }
    parts.push(this.jobs('Running', snap.running, 'running'));
    parts.push(this.jobs('Waiting', snap.waiting, 'waiting'));
    this._body.replaceChildren(...parts);
  }

  private workerRow(worker: IWorker, gpus: IGpu[]): HTMLElement {
    const up = worker.state === 'up';
    const row = el('div', `lan2gpu-worker lan2gpu-${up ? 'up' : 'down'}`);
    row.dataset.worker = worker.name || worker.address;
    const line = el('div', 'lan2gpu-worker-line');
    line.appendChild(el('span', 'lan2gpu-dot'));
    line.appendChild(el('span', 'lan2gpu-name', worker.name || worker.address));
    line.appendChild(el('span', 'lan2gpu-state', up ? 'up' : worker.state));
    line.title = `${worker.address} (${worker.origin}); click for the dashboard`;
    line.onclick = () => this._opened.emit(worker.name || worker.address);
    row.appendChild(line);
    if (!up && worker.problem) {
      row.appendChild(el('div', 'lan2gpu-problem', worker.problem));
    }
    for (const gpu of gpus.filter(g => g.address === worker.address)) {
      const item = el('div', `lan2gpu-gpu${gpu.stale ? ' lan2gpu-stale' : ''}`);
      item.dataset.gpu = `${gpu.worker}:${gpu.index}`;
      const util = gpu.utilization === null ? '–' : `${gpu.utilization}%`;
      const text =
        `GPU${gpu.index} ${gpu.name} · ${util} · ` +
        `${size(gpu.memory_used)} / ${size(gpu.memory_total)}` +
        (gpu.running || gpu.waiting ? ` · ${gpu.running} running, ${gpu.waiting} waiting` : '');
      item.appendChild(el('div', 'lan2gpu-gpu-text', text));
      item.appendChild(sparkline(gpu));
      item.title = 'utilization (solid) and memory (dashed), the last minutes';
      item.onclick = () => this._opened.emit(gpu.worker);
      row.appendChild(item);
    }
    return row;
  }

  private jobs(title: string, jobs: IJob[], key: 'running' | 'waiting'): HTMLElement {
    const box = el('div', `lan2gpu-jobs lan2gpu-jobs-${key}`);
    box.appendChild(el('h3', 'lan2gpu-section', `${title} (${jobs.length})`));
    for (const job of jobs) {
      const item = el('div', `lan2gpu-job${job.mine ? ' lan2gpu-mine' : ''}`);
      item.dataset.cell = job.id;
      const where = `${job.worker} ${job.resources.join('+') || 'cpu'}`;
      const seconds = (key === 'running' ? job.running : job.waiting).toFixed(0);
      const who = job.mine ? 'mine' : job.session;
      item.textContent = `${where} · ${seconds} s · ${who}`;
      box.appendChild(item);
    }
    return box;
  }

  private _body: HTMLElement;
  private _timer: number | null = null;
  private _busy = false;
  private _failed = new Signal<this, string>(this);
  private _opened = new Signal<this, string>(this);
  private _refreshed = new Signal<this, ISnapshot>(this);
}
