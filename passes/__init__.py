"""ldpruner.passes: analysis (importance), selection, rewrite, distillation, export."""
