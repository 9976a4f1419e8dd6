// Lint for the extension's TypeScript (jlpm lint), with type information.
import js from '@eslint/js';
import tseslint from 'typescript-eslint';

export default tseslint.config(
  { ignores: ['lib/', 'node_modules/', '../lan2gpu_magic/labextension/'] },
  js.configs.recommended,
  ...tseslint.configs.recommendedTypeChecked,
  {
    languageOptions: {
      parserOptions: { project: './tsconfig.json', tsconfigRootDir: import.meta.dirname }
    },
    rules: {
      '@typescript-eslint/no-namespace': 'off',
      eqeqeq: 'error'
    }
  },
  { files: ['eslint.config.mjs'], ...tseslint.configs.disableTypeChecked }
);
