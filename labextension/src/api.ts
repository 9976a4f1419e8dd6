/**
 * The dashboard's JSON API (`/lan2gpu/api/{workers,gpus,jobs}`, served by the
 * jupyter_server extension in lan2gpu_magic/dashboard), read through JupyterLab's
 * server connection so that the server's authentication applies as to the lab itself.
 */
import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';

export interface IWorker {
  name: string;
  address: string;
  origin: string;
  state: string; // "up", or why not ("unreachable", "refused", ...)
  problem: string | null;
  simulator?: boolean;
  gpus?: number;
  running?: number;
  waiting?: number;
}

export interface IGpu {
  worker: string;
  address: string;
  stale: boolean;
  index: number;
  name: string;
  simulated: boolean;
  memory_total: number;
  memory_used: number;
  utilization: number | null;
  running: number;
  waiting: number;
  /** [wall time, utilization %, memory used, cells running], oldest first */
  history: Array<Array<number | null>>;
}

export interface IJob {
  worker: string;
  address: string;
  id: string;
  session: string;
  resources: string[];
  running: number;
  waiting: number;
  mine?: boolean;
}

export interface ISnapshot {
  workers: IWorker[];
  gpus: IGpu[];
  running: IJob[];
  waiting: IJob[];
  error: string | null;
}

async function get<T>(part: string, settings: ServerConnection.ISettings): Promise<T> {
  const url = URLExt.join(settings.baseUrl, 'lan2gpu', 'api', part);
  const response = await ServerConnection.makeRequest(url, {}, settings);
  if (!response.ok) {
    throw new Error(`${url}: ${response.status} ${response.statusText}`);
  }
  return (await response.json()) as T;
}

/** One look at every worker, its GPUs and the cells on them. */
export async function fetchSnapshot(
  settings: ServerConnection.ISettings = ServerConnection.makeSettings()
): Promise<ISnapshot> {
  const [workers, gpus, jobs] = await Promise.all([
    get<{ workers: IWorker[]; error: string | null }>('workers', settings),
    get<{ gpus: IGpu[] }>('gpus', settings),
    get<{ running: IJob[]; waiting: IJob[] }>('jobs', settings)
  ]);
  return {
    workers: workers.workers,
    gpus: gpus.gpus,
    running: jobs.running ?? [],
    waiting: jobs.waiting ?? [],
    error: workers.error
  };
}

/** The status bar's one line: "lan2gpu: 3 workers · 7 GPUs · 1 running", or why not. */
export function summary(snap: ISnapshot): string {
  const up = snap.workers.filter(w => w.state === 'up');
  if (snap.workers.length === 0) {
    return snap.error ? `lan2gpu: ${snap.error}` : 'lan2gpu: no workers known';
  }
  if (up.length === 0) {
    const why = snap.workers[0].problem || snap.workers[0].state;
    const n = snap.workers.length;
    return `lan2gpu: no worker reachable (${n} known; ${why})`;
  }
  const gpus = snap.gpus.filter(g => !g.stale).length;
  const plural = (n: number, word: string): string => `${n} ${word}${n === 1 ? '' : 's'}`;
  return (
    `lan2gpu: ${plural(up.length, 'worker')} · ${plural(gpus, 'GPU')} · ` +
    `${snap.running.length} running`
  );
}

export interface IKernelRequest {
  name: string;
  display_name?: string;
  worker?: string;
  gpu?: string;
  min_memory?: string;
  min_cc?: string;
  gpus?: string;
  workers?: string;
  cpu?: boolean;
  simulate?: boolean;
}

/** Install a LAN kernelspec for this user; the server's message on failure. */
export async function installKernel(
  body: IKernelRequest,
  settings: ServerConnection.ISettings = ServerConnection.makeSettings()
): Promise<IInstalled> {
  const url = URLExt.join(settings.baseUrl, 'lan2gpu', 'api', 'kernelspecs');
  const init = { method: 'POST', body: JSON.stringify(body) };
  const response = await ServerConnection.makeRequest(url, init, settings);
  const reply = (await response.json().catch(() => ({}))) as IInstalled & { message?: string };
  if (!response.ok) {
    throw new Error(reply.message || `${response.status} ${response.statusText}`);
  }
  return reply;
}

export interface IInstalled {
  name: string;
  display_name: string;
  path: string;
}
