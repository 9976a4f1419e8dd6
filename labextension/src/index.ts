/**
 * lan2gpu in JupyterLab: a sidebar with the workers, their GPUs and the cells on
 * them; a status bar item; the full dashboard in a main-area tab; and a form that
 * installs a LAN kernelspec. Everything reads the dashboard's JSON API.
 */
import {
  ILabShell,
  ILayoutRestorer,
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import {
  Dialog,
  ICommandPalette,
  IFrame,
  MainAreaWidget,
  showDialog,
  showErrorMessage
} from '@jupyterlab/apputils';
import { PageConfig, URLExt } from '@jupyterlab/coreutils';
import { ILauncher } from '@jupyterlab/launcher';
import { IStatusBar } from '@jupyterlab/statusbar';
import { LabIcon } from '@jupyterlab/ui-components';
import { Widget } from '@lumino/widgets';

import { fetchSnapshot, installKernel, ISnapshot, summary } from './api';
import { KernelForm } from './form';
import { Lan2GPUPanel } from './panel';

const ICON_SVG =
  '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 24 24" width="16">' +
  '<g class="jp-icon3" fill="#616161">' +
  '<rect x="3" y="6" width="18" height="12" rx="1.5" fill="none" stroke="#616161" ' +
  'stroke-width="2"/><rect x="6" y="9" width="4" height="6"/><rect x="12" y="9" ' +
  'width="6" height="2"/><rect x="12" y="13" width="6" height="2"/>' +
  '<rect x="6" y="18" width="2" height="3"/><rect x="16" y="18" width="2" height="3"/>' +
  '</g></svg>';

export const lan2gpuIcon = new LabIcon({ name: 'lan2gpu:gpu', svgstr: ICON_SVG });

const STATUS_POLL_MS = 10000;

namespace CommandIDs {
  export const dashboard = 'lan2gpu:open-dashboard';
  export const installKernel = 'lan2gpu:install-kernel';
  export const panel = 'lan2gpu:show-panel';
}

/** The status bar item: one line about the fleet; a click opens the panel. */
class StatusItem extends Widget {
  constructor(onClick: () => void) {
    super();
    this.addClass('lan2gpu-status');
    this.node.textContent = 'lan2gpu: …';
    this.node.title = 'lan2gpu workers; click for the panel';
    this.node.onclick = onClick;
  }

  display(snap: ISnapshot): void {
    this.node.textContent = summary(snap);
  }

  failed(error: unknown): void {
    this.node.textContent = `lan2gpu: dashboard API unavailable (${String(error)})`;
  }
}

function dashboardUrl(): string {
  return URLExt.join(PageConfig.getBaseUrl(), 'lan2gpu/');
}

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'lan2gpu:plugin',
  description: 'lan2gpu workers, GPUs and cells in a sidebar, the status bar and a tab.',
  autoStart: true,
  requires: [ILabShell],
  optional: [ICommandPalette, ILauncher, IStatusBar, ILayoutRestorer],
  activate: (
    app: JupyterFrontEnd,
    shell: ILabShell,
    palette: ICommandPalette | null,
    launcher: ILauncher | null,
    statusBar: IStatusBar | null,
    restorer: ILayoutRestorer | null
  ): void => {
    const panel = new Lan2GPUPanel();
    panel.title.icon = lan2gpuIcon;
    shell.add(panel, 'left', { rank: 900 });
    if (restorer) {
      restorer.add(panel, 'lan2gpu-panel');
    }

    let dashboard: MainAreaWidget<IFrame> | null = null;
    const openDashboard = (): void => {
      if (dashboard === null || dashboard.isDisposed) {
        // The dashboard is this server's own page: it needs its scripts and its origin
        // (for the API and the login cookie), so this is no sandbox against it.
        const frame = new IFrame({ sandbox: ['allow-scripts', 'allow-same-origin'] });
        dashboard = new MainAreaWidget({ content: frame });
        dashboard.id = 'lan2gpu-dashboard';
        dashboard.title.label = 'lan2gpu dashboard';
        dashboard.title.icon = lan2gpuIcon;
        dashboard.title.closable = true;
        shell.add(dashboard, 'main');
      }
      dashboard.content.url = dashboardUrl();
      shell.activateById(dashboard.id);
    };
    panel.opened.connect(() => openDashboard());

    app.commands.addCommand(CommandIDs.dashboard, {
      label: 'lan2gpu dashboard',
      caption: 'Workers, GPUs, queues and cells of lan2gpu, in a tab',
      icon: args => (args['isPalette'] ? undefined : lan2gpuIcon),
      execute: () => openDashboard()
    });
    app.commands.addCommand(CommandIDs.panel, {
      label: 'Show the lan2gpu panel',
      execute: () => shell.activateById(panel.id)
    });
    app.commands.addCommand(CommandIDs.installKernel, {
      label: 'Install a lan2gpu kernel…',
      caption: 'A kernelspec whose kernels run on a LAN GPU worker',
      icon: args => (args['isPalette'] ? undefined : lan2gpuIcon),
      execute: async () => {
        const result = await showDialog({
          title: 'Install a lan2gpu kernel',
          body: new KernelForm(),
          buttons: [Dialog.cancelButton(), Dialog.okButton({ label: 'Install' })]
        });
        if (!result.button.accept || result.value === null) {
          return;
        }
        try {
          const done = await installKernel(result.value);
          await app.serviceManager.kernelspecs.refreshSpecs();
          await showDialog({
            title: 'lan2gpu kernel installed',
            body: `"${done.display_name}" (${done.name}) is in ${done.path}; pick it from the launcher or a notebook's kernel menu.`,
            buttons: [Dialog.okButton()]
          });
        } catch (error) {
          await showErrorMessage('lan2gpu: the kernel was not installed', String(error));
        }
      }
    });
    for (const command of [CommandIDs.dashboard, CommandIDs.installKernel]) {
      palette?.addItem({ command, category: 'lan2gpu' });
      launcher?.add({ command, category: 'Other', rank: 50 });
    }
    palette?.addItem({ command: CommandIDs.panel, category: 'lan2gpu' });

    if (statusBar) {
      const item = new StatusItem(() => shell.activateById(panel.id));
      statusBar.registerStatusItem('lan2gpu:status', { item, align: 'left', rank: 100 });
      panel.refreshed.connect((_, snap) => item.display(snap));
      panel.failed.connect((_, error) => item.failed(error));
      let busy = false;
      const poll = async (): Promise<void> => {
        if (panel.polling || busy || document.hidden) {
          return; // the panel's polls keep the item current; nothing for a hidden tab
        }
        busy = true;
        try {
          item.display(await fetchSnapshot());
        } catch (error) {
          item.failed(error);
        } finally {
          busy = false;
        }
      };
      void poll();
      window.setInterval(() => void poll(), STATUS_POLL_MS);
    }
  }
};

export default plugin;
