/** The "Install a lan2gpu kernel…" form: the options `install-kernel` takes. */
import { Widget } from '@lumino/widgets';

import { IKernelRequest } from './api';

const FIELDS: Array<[keyof IKernelRequest, string, string]> = [
  ['name', 'Name', 'a100 (letters, digits, - _ .)'],
  ['display_name', 'Display name', 'Python (LAN a100)'],
  ['gpu', 'GPU model', 'A100 (a pattern)'],
  ['min_memory', 'At least this much GPU memory', '40G'],
  ['min_cc', 'Compute capability at least', '8.0'],
  ['gpus', 'GPUs', '1'],
  ['worker', 'Worker', 'name or address'],
  ['workers', 'Worker addresses', 'tcp://10.0.0.7:7340,... (if not found by mDNS)']
];

export class KernelForm extends Widget {
  constructor() {
    super({ node: document.createElement('form') });
    this.addClass('lan2gpu-form');
    for (const [key, label, hint] of FIELDS) {
      const row = document.createElement('label');
      row.textContent = label;
      const input = document.createElement('input');
      input.className = 'jp-mod-styled';
      input.name = key;
      input.placeholder = hint;
      row.appendChild(input);
      this.node.appendChild(row);
    }
    for (const [key, label] of [
      ['cpu', 'A CPU kernel (no GPU)'],
      ['simulate', "Allow workers that run Numba's CUDA simulator"]
    ]) {
      const row = document.createElement('label');
      row.className = 'lan2gpu-check';
      const box = document.createElement('input');
      box.type = 'checkbox';
      box.name = key;
      row.appendChild(box);
      row.appendChild(document.createTextNode(` ${label}`));
      this.node.appendChild(row);
    }
  }

  getValue(): IKernelRequest {
    const value: Record<string, string | boolean> = {};
    for (const input of Array.from(this.node.querySelectorAll('input'))) {
      if (input.type === 'checkbox') {
        value[input.name] = input.checked;
      } else if (input.value.trim()) {
        value[input.name] = input.value.trim();
      }
    }
    return value as unknown as IKernelRequest;
  }
}
